"""Pair packs (THD), the DPO forward step, and the frozen reference's log-probs (computed once, cached).

A pack holds whole pairs: pair k is two THD sequences, its chosen (prompt + chosen response) then its
rejected (prompt + rejected response), each its own ``cu_seqlens`` segment, so no token attends across
them (nor across pairs); position ids restart at every sequence. The loss mask covers the response
tokens only (data.py), so the per-sequence log-probs are sums over the responses. Pairs are packed
best-fit-decreasing per epoch like SFT samples (data/packing.py: ``plan_epoch`` over pair lengths, with
the same per-epoch reshuffle); a step takes ``training.global_batch_size`` packs, DP rank r its slice,
one pack per micro-batch, and the position (packs consumed) is checkpointed like SFT's.

The loss needs both sequences of a pair: they are in one micro-batch, so the per-pair loss is computed
in the micro-batch's loss function (on the last pipeline stage), summed, and divided by the number of
pairs of the global batch (Megatron's per-token-loss path with "tokens" = pairs).

Reference log-probs (``log π_ref`` of each chosen and rejected response, float64 sums) are computed
before training with the initial weights (the loaded ``checkpoint.load`` = the frozen reference, or the
seeded initialization without one), over epoch 0's packs (so at step 1 the policy's numbers are the
reference's, pack for pack), and saved under ``CACHE/dpo_reference_<key>.pt``; the key covers the
tokenized pairs, ``seq_length``, the model config and precision, and the reference checkpoint (its path
and its files' names, sizes and mtimes). A resumed run reads the file (the checkpoint records the
reference and the key); only when the file is gone does it recompute it, from the recorded reference
checkpoint (not from the resumed weights).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kimi.data.packing import build_pack
from megatron_kimi.data.sft_source import PackedSFTSource, to_thd_batch
from megatron_kimi.dpo.data import PairSet
from megatron_kimi.dpo.loss import dpo_loss, pair_logps, pair_report
from megatron_kimi.rl.loss import segment_sum
from megatron_kimi.training.lm_step import packed_to_device

REFERENCE_VERSION = "dpo-reference-v1"


# ---- the pairs that fit -------------------------------------------------------------------------

class PairView:
    """The pairs of a :class:`PairSet` that fit ``seq_length``; item k = pair ``index[k]``. As a packing
    "cache", item j of :meth:`sample` is sequence j: pair j // 2's chosen (j even) or rejected (j odd)."""

    def __init__(self, pairs: PairSet, index: np.ndarray):
        self.pairs = pairs
        self.index = np.asarray(index, dtype=np.int64)
        self.lengths = pairs.pair_lengths[self.index]
        self.source = pairs.source
        self.source_lines = pairs.lines[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, j: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.pairs.sequence(2 * int(self.index[j // 2]) + j % 2)


def fit_pairs(pairs: PairSet, seq_length: int, overlong: str = "drop") -> Tuple[PairView, int]:
    """(the pairs with chosen + rejected <= ``seq_length``, how many were left out); with
    ``overlong="error"`` a pair that does not fit is a ``ValueError`` naming its line."""
    lens = pairs.pair_lengths
    over = np.flatnonzero(lens > seq_length)
    if len(over) and overlong == "error":
        k = int(over[0])
        c, r = (int(x) for x in pairs.seq_lengths[2 * k: 2 * k + 2])
        raise ValueError(f"{pairs.source}:{int(pairs.lines[k])}: pair of {c + r} tokens (chosen {c} + rejected {r}) "
                         f"does not fit training.seq_length={seq_length} ({len(over)} such pair(s); "
                         "data.overlong=error; set it to 'drop' to leave them out, counted)")
    return PairView(pairs, np.flatnonzero(lens <= seq_length)), len(over)


# ---- packs ---------------------------------------------------------------------------------------

def build_pair_pack(view: PairView, pair_ids, capacity: int, pad_id: int,
                    reference: Optional[np.ndarray] = None) -> Dict[str, object]:
    """One micro-batch: pairs ``pair_ids`` of ``view`` as 2 THD sequences each (chosen, rejected, ...),
    with ``pair_index`` [P] and, given the reference log-probs [len(view), 2], ``ref_logps`` [P, 2]."""
    ids = [int(p) for p in pair_ids]
    pack = build_pack(view, [2 * p + w for p in ids for w in (0, 1)], capacity, pad_id, truncate=False)
    batch = to_thd_batch(pack)
    batch["pair_index"] = torch.tensor(ids, dtype=torch.long)
    if reference is not None:
        batch["ref_logps"] = torch.from_numpy(np.ascontiguousarray(reference[ids], dtype=np.float64))
    return batch


class DPOPairSource(PackedSFTSource):
    """Global batches of pair packs, addressed by packs consumed (SFT's planning and position)."""

    def __init__(self, view: PairView, seq_length: int, packs_per_step: int, dp_rank: int, dp_size: int, seed: int,
                 pad_id: int, reference: Optional[np.ndarray] = None):
        super().__init__(view, seq_length, packs_per_step, dp_rank, dp_size, seed, pad_id, overlong="drop")
        self.reference = reference  # [len(view), 2] float64: log π_ref of (chosen, rejected)

    def pack(self, pair_ids, with_reference: bool = True) -> Dict[str, object]:
        return build_pair_pack(self.cache, pair_ids, self.seq_length, self.pad_id,
                               self.reference if with_reference else None)

    def microbatches(self, consumed_samples: int) -> List[Dict[str, object]]:
        assert self.reference is not None, "the reference log-probs are not there yet"
        epoch, offset = self.locate(consumed_samples)
        bins = self.plan(epoch).bins[offset: offset + self.global_batch_size]
        per_rank = self.global_batch_size // self.dp_size
        return [self.pack(b) for b in bins[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]]


# ---- forward steps -------------------------------------------------------------------------------

def _forward(model, batch):
    device = next(model.parameters()).device
    packed = packed_to_device(batch["packed_seq_params"], device)
    out = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                labels=batch["labels"].to(device), packed_seq_params=packed)
    return out, packed, device


def sequence_logps(ce_1T: torch.Tensor, loss_mask_1T: torch.Tensor, cu_seqlens_padded: torch.Tensor):
    """Per-sequence sums of ``−CE`` over the loss tokens (float64 [S]) and the loss-token counts [S]."""
    mask = loss_mask_1T[0].to(ce_1T.device).double()
    return -segment_sum(ce_1T[0].double() * mask, cu_seqlens_padded), segment_sum(mask, cu_seqlens_padded)


def _dpo_loss_func(batch, packed, device, beta: float, loss_type: str, label_smoothing: float, output_1T):
    logp_S, tokens_S = sequence_logps(output_1T, batch["loss_mask"], packed.cu_seqlens_q_padded)
    chosen, rejected = pair_logps(logp_S, tokens_S, loss_type)
    ref_c, ref_r = pair_logps(batch["ref_logps"].to(device).reshape(-1), tokens_S, loss_type)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_c, ref_r, beta, loss_type, label_smoothing)
    report = pair_report(losses, chosen_rewards, rejected_rewards, chosen, rejected)
    return losses.sum(), torch.tensor(losses.numel(), dtype=torch.int, device=device), {"dpo": report}


def dpo_forward_step(data_iterator, model, *, beta: float, loss_type: str, label_smoothing: float):
    """Training micro-batch: per-token CE -> per-sequence log-probs -> per-pair DPO loss (last stage)."""
    batch = next(data_iterator)
    out, packed, device = _forward(model, batch)
    return out, partial(_dpo_loss_func, batch, packed, device, beta, loss_type, label_smoothing)


def make_dpo_forward_step(dpo_cfg):
    return partial(dpo_forward_step, beta=dpo_cfg.beta, loss_type=dpo_cfg.loss, label_smoothing=dpo_cfg.label_smoothing)


def _reference_loss_func(batch, packed, output_1T):
    logp_S, _ = sequence_logps(output_1T, batch["loss_mask"], packed.cu_seqlens_q_padded)
    return logp_S.sum() * 0.0, {"ref": logp_S.detach().reshape(-1, 2).clone(), "idx": batch["pair_index"]}


def _reference_forward_step(data_iterator, model):
    batch = next(data_iterator)
    out, packed, _ = _forward(model, batch)
    return out, partial(_reference_loss_func, batch, packed)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def compute_reference(model_chunks, source: DPOPairSource) -> np.ndarray:
    """log π(y|x) of every pair's chosen and rejected response under the current weights ([len(view), 2],
    float64, on every rank): epoch 0's packs, split over DP ranks (collective)."""
    bins = source.plan(0).bins
    mbs = [source.pack(b, with_reference=False) for b in bins[source.dp_rank::source.dp_size]]
    out = []
    if mbs:
        for m in model_chunks:
            m.eval()
        try:
            data = [iter(mbs) for _ in model_chunks] if len(model_chunks) > 1 else iter(mbs)
            out = get_forward_backward_func()(
                forward_step_func=_reference_forward_step, data_iterator=data,
                model=model_chunks if len(model_chunks) > 1 else model_chunks[0], num_microbatches=len(mbs),
                seq_length=source.seq_length, micro_batch_size=1, forward_only=True)
        finally:
            for m in model_chunks:
                m.train()
    n = len(source.cache)
    device = _device()
    values = torch.zeros(n, 2, dtype=torch.float64, device=device)
    seen = torch.zeros(n, dtype=torch.float64, device=device)
    for rec in out or []:
        idx = rec["idx"].to(device)
        values[idx] = rec["ref"].to(device)
        seen[idx] += 1
    for group in (parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
            dist.all_reduce(seen, group=group)
    assert bool((seen == 1).all()), "every pair must be in exactly one reference pack"
    return values.cpu().numpy()


# ---- the cache -----------------------------------------------------------------------------------

def checkpoint_fingerprint(ckpt: Optional[Path]) -> Dict[str, object]:
    """What identifies the reference weights: the checkpoint's path and its files (name, size, mtime)."""
    if ckpt is None:
        return {"checkpoint": None}
    ckpt = Path(ckpt).resolve()
    files = sorted((str(p.relative_to(ckpt)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in ckpt.rglob("*") if p.is_file())
    return {"checkpoint": str(ckpt), "files": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def reference_key(cfg, view: PairView, fingerprint: Dict[str, object]) -> str:
    """The cache key of a run's reference log-probs (``cfg``: a DPOConfig; ``fingerprint``: the reference
    checkpoint's, :func:`checkpoint_fingerprint`)."""
    from megatron_kimi.config import to_dict

    ckpt = fingerprint.get("checkpoint")
    ident = {
        "version": REFERENCE_VERSION,
        "pairs": view.pairs.key,
        "kept": hashlib.sha256(view.index.tobytes()).hexdigest(),
        "seq_length": cfg.training.seq_length,
        "model": to_dict(cfg.model),
        "dtype": cfg.precision.dtype,
        "lm_loss_impl": cfg.training.lm_loss_impl,
        "reference": fingerprint,
        "init_seed": cfg.training.seed if ckpt is None else None,  # no checkpoint: the seeded initialization
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def reference_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"dpo_reference_{key[:20]}.pt"


def load_reference(path: Path, key: str, num_pairs: int) -> Optional[np.ndarray]:
    """The cached values, or None (no file, or one for another key / size)."""
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("key") != key or tuple(blob["values"].shape) != (num_pairs, 2):
        return None
    return blob["values"].numpy()


def save_reference(path: Path, key: str, values: np.ndarray, meta: dict) -> None:
    """Atomic: a kill mid-write leaves no file (the next run recomputes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"key": key, "values": torch.from_numpy(np.asarray(values, dtype=np.float64)), "meta": meta}, tmp)
    os.replace(tmp, path)
