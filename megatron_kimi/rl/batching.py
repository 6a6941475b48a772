"""Rollout samples -> packed THD micro-batches, the trainer's reference log-probs, the RL forward step.

Samples (prompt + response) are packed best-fit-decreasing into packs of ``capacity`` tokens; the loss
mask covers response tokens only. Each pack carries, per sample, the advantage ``r − r̄``, the
reference log-prob ``log π_θi(y|x)`` and the sample's index in the rollout batch. Every DP rank gets
the same number of packs (empty ones, with no samples, fill the gap).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kimi.data.packing import best_fit_decreasing
from megatron_kimi.data.sft_source import to_thd_batch
from megatron_kimi.rl.loss import segment_sum
from megatron_kimi.rl.types import Sample
from megatron_kimi.training.lm_step import packed_to_device


def _pack(samples: Sequence[Sample], indices: List[int], capacity: int, pad_id: int) -> dict:
    tokens, labels, mask, pos, bounds = [], [], [], [], [0]
    for i in indices:
        s = samples[i]
        ids = list(s.prompt_ids) + list(s.response_ids)
        n_prompt = len(s.prompt_ids)
        tokens += ids
        labels += ids[1:] + [pad_id]
        # label t is the token t+1: a response token iff t+1 >= n_prompt
        mask += [1.0 if t + 1 >= n_prompt and t + 1 < len(ids) else 0.0 for t in range(len(ids))]
        pos += list(range(len(ids)))
        bounds.append(bounds[-1] + len(ids))
    used = bounds[-1]
    assert used <= capacity, (used, capacity)
    pad = capacity - used
    if pad or not indices:  # the tail joins the last segment (or forms one, for an empty pack)
        tokens += [pad_id] * pad
        labels += [pad_id] * pad
        mask += [0.0] * pad
        start = pos[-1] + 1 if pos and indices else 0
        pos += list(range(start, start + pad))
    padded = list(bounds)
    if indices:
        padded[-1] = capacity
    else:
        padded = [0, capacity]
    t = lambda x, dt: torch.tensor([x], dtype=dt)  # noqa: E731
    pack = {
        "tokens": t(tokens, torch.long), "labels": t(labels, torch.long), "loss_mask": t(mask, torch.float32),
        "position_ids": t(pos, torch.long), "cu_seqlens": bounds if indices else [0, 0], "cu_seqlens_padded": padded,
    }
    return pack


def pack_samples(samples: Sequence[Sample], order: Sequence[int], capacity: int, pad_id: int,
                 dp_rank: int, dp_size: int, adv: torch.Tensor) -> List[Dict]:
    """This DP rank's micro-batches (one pack each) over the samples ``order``."""
    lengths = [samples[i].length for i in order]
    too_long = [samples[i].length for i in order if samples[i].length > capacity]
    if too_long:
        raise ValueError(f"training.seq_length={capacity} is shorter than a sample ({max(too_long)} tokens)")
    bins = [[order[j] for j in b] for b in best_fit_decreasing(lengths, capacity)]
    while len(bins) % dp_size:
        bins.append([])
    mine = bins[dp_rank::dp_size]
    out = []
    for b in mine:
        pack = to_thd_batch(_pack(samples, b, capacity, pad_id)) if b else _empty(capacity, pad_id)
        n = len(b)
        pack["sample_index"] = torch.tensor(b + [-1] * (n == 0), dtype=torch.long)
        pack["adv"] = torch.tensor([float(adv[i]) for i in b] or [0.0], dtype=torch.float32)
        pack["ref_logp"] = torch.tensor([float(samples[i].ref_logp or 0.0) for i in b] or [0.0], dtype=torch.float32)
        pack["valid"] = torch.tensor([1.0] * n or [0.0])
        out.append(pack)
    return out


def _empty(capacity: int, pad_id: int) -> dict:
    pack = _pack([], [], capacity, pad_id)
    pack["cu_seqlens"] = [0, capacity]
    return to_thd_batch(pack)


def _seq_logp(model, batch):
    device = next(model.parameters()).device
    packed = packed_to_device(batch["packed_seq_params"], device)
    ce_1T = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                  labels=batch["labels"].to(device), packed_seq_params=packed)
    ce_T = ce_1T[0].float() * batch["loss_mask"][0].to(device)
    return -segment_sum(ce_T, packed.cu_seqlens_q_padded), device


def rl_forward_step(data_iterator, model, *, loss_fn: Callable, tau: float):
    """Training micro-batch: per-sample log π_θ from the per-token CE, then the RL loss."""
    batch = next(data_iterator)
    logp_N, device = _seq_logp(model, batch)

    def loss_func(_unused):
        valid = batch["valid"].to(device)
        terms = loss_fn(logp_N, batch["ref_logp"].to(device), batch["adv"].to(device), tau) * valid
        n = valid.sum()
        log_ratio = ((logp_N - batch["ref_logp"].to(device)) * valid).sum()
        report = torch.stack([terms.sum().detach(), n, log_ratio.detach()]).clone()
        return terms.sum(), n.to(torch.int), {"rl": report}

    return logp_N, loss_func


def _logp_forward_step(data_iterator, model):
    batch = next(data_iterator)
    logp_N, _ = _seq_logp(model, batch)
    return logp_N, lambda _o: (logp_N.sum() * 0.0, {"logp": logp_N.detach().clone(), "idx": batch["sample_index"]})


@torch.no_grad()
def reference_logprobs(model_chunks, microbatches: List[Dict], num_samples: int, seq_length: int) -> torch.Tensor:
    """log π(y|x) of every sample under the current weights, on every rank ([num_samples], float64)."""
    for m in model_chunks:
        m.eval()
    out = get_forward_backward_func()(
        forward_step_func=_logp_forward_step, data_iterator=iter(microbatches), model=model_chunks[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=1, forward_only=True,
    )
    for m in model_chunks:
        m.train()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    full = torch.zeros(num_samples, dtype=torch.float64, device=device)
    for rec in out or []:
        idx = rec["idx"]
        keep = idx >= 0
        full[idx[keep].to(device)] = rec["logp"][keep.to(rec["logp"].device)].double().to(device)
    dist.all_reduce(full, group=parallel_state.get_data_parallel_group())
    return full.cpu()


def make_rl_forward_step(loss_fn: Callable, tau: float):
    return partial(rl_forward_step, loss_fn=loss_fn, tau=tau)
