"""Rollout samples -> packed THD micro-batches, the trainer's reference log-probs, the RL forward step.

Samples (prompt + response) are packed best-fit-decreasing into packs of ``capacity`` tokens; the loss
mask covers response tokens only (from ``Sample.loss_start`` on: partial rollouts). Each pack carries, per sample, the advantage ``r − r̄``, the
reference log-prob ``log π_θi(y|x)`` and the sample's index in the rollout batch, and (once the
reference pass has run) the reference log-prob of every loss token. Every DP rank gets the same
number of packs (empty ones, with no samples, fill the gap).

Two training forward steps (:func:`make_rl_forward_step`): the registry loss on per-sample sums
``log π_θ(y|x)`` (any ``rl.loss``), and, for ``rl.loss=mirror_descent`` with ``rl.logprob_impl=fused``,
the packed mirror-descent kernel on per-token log-ratios. They are the same function of θ:
``Σ_t mask_t·(log π_θ − log π_θi)_t = log π_θ(y|x) − log π_θi(y|x)``; the per-token form takes the
difference before the sum (exactly 0 at θ = θi, and no cancellation between two large sums of a long
response).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kimi.data.packing import best_fit_decreasing
from megatron_kimi.data.sft_source import to_thd_batch
from megatron_kimi.kernels.mirror_descent_loss import mirror_descent_loss_packed
from megatron_kimi.rl.loss import get_loss, segment_sum
from megatron_kimi.rl.types import Sample
from megatron_kimi.rl.images import pack_images
from megatron_kimi.training.lm_step import image_kwargs, packed_to_device


def _loss_mask(n_prompt: int, n: int) -> List[float]:
    # label t is the token t+1: a response token iff t+1 >= n_prompt
    return [1.0 if t + 1 >= n_prompt and t + 1 < n else 0.0 for t in range(n)]


def loss_token_count(sample: Sample) -> int:
    """How many loss tokens (masked labels) the sample has in a pack: its response tokens from
    ``loss_start`` on (partial rollouts: earlier segments are context)."""
    return int(sum(_loss_mask(len(sample.prompt_ids) + sample.loss_start, sample.length)))


def _old_logp(loss_mask_1T: torch.Tensor, per_sample: List[torch.Tensor]) -> torch.Tensor:
    """[1, T]: each sample's per-token reference log-probs at its loss tokens (pack order), 0 elsewhere."""
    old = torch.zeros_like(loss_mask_1T)
    pos = loss_mask_1T[0].nonzero()[:, 0]
    vals = torch.cat([v.float() for v in per_sample]) if per_sample else old.new_zeros(0)
    assert vals.numel() == pos.numel(), (vals.numel(), pos.numel())
    old[0, pos] = vals
    return old


def _pack(samples: Sequence[Sample], indices: List[int], capacity: int, pad_id: int) -> dict:
    tokens, labels, mask, pos, bounds = [], [], [], [], [0]
    for i in indices:
        s = samples[i]
        ids = list(s.prompt_ids) + list(s.response_ids)
        n_prompt = len(s.prompt_ids) + s.loss_start  # labels before it are context
        tokens += ids
        labels += ids[1:] + [pad_id]
        mask += _loss_mask(n_prompt, len(ids))
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
        images = pack_images(samples, b, capacity) if b else None
        if images is not None:
            pack["images"] = images
        if all(samples[i].ref_token_logp is not None for i in b):
            pack["old_logp"] = _old_logp(pack["loss_mask"], [samples[i].ref_token_logp for i in b])
        out.append(pack)
    return out


def _empty(capacity: int, pad_id: int) -> dict:
    pack = _pack([], [], capacity, pad_id)
    pack["cu_seqlens"] = [0, capacity]
    return to_thd_batch(pack)


def _token_ce(model, batch):
    """The model's per-token CE ``−log π(label)`` ([T], fp32), the loss mask, packed params, device."""
    device = next(model.parameters()).device
    packed = packed_to_device(batch["packed_seq_params"], device)
    ce_1T = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                  labels=batch["labels"].to(device), packed_seq_params=packed, **image_kwargs(batch, device))
    return ce_1T[0].float(), batch["loss_mask"][0].to(device), packed, device


def _seq_logp(model, batch):
    ce_T, mask_T, packed, device = _token_ce(model, batch)
    return -segment_sum(ce_T * mask_T, packed.cu_seqlens_q_padded), device


def _rl_report(terms_N, valid_N, log_ratio_N):
    # lm_step.REPORT_FIELDS["rl"]: loss_sum, loss_count (samples), log_ratio_sum
    n = valid_N.sum()
    report = torch.stack([terms_N.sum().detach(), n, (log_ratio_N.detach() * valid_N).sum()]).clone()
    return terms_N.sum(), n.to(torch.int), {"rl": report}


def rl_forward_step(data_iterator, model, *, loss_fn: Callable, tau: float):
    """Training micro-batch: per-sample log π_θ from the per-token CE, then the RL loss."""
    batch = next(data_iterator)
    logp_N, device = _seq_logp(model, batch)

    def loss_func(_unused):
        valid, ref = batch["valid"].to(device), batch["ref_logp"].to(device)
        terms = loss_fn(logp_N, ref, batch["adv"].to(device), tau) * valid
        return _rl_report(terms, valid, logp_N - ref)

    return logp_N, loss_func


def rl_forward_step_packed_md(data_iterator, model, *, tau: float):
    """Training micro-batch, mirror descent on per-token log-ratios (the packed loss kernel).

    ``log π_θ`` per token comes from the model (the fused log-prob kernel when its ``lm_head_impl`` is
    fused); ``(adv − τ·Σ_seq mask·(log π_θ − log π_θi))²`` per sample from ``mirror_descent_loss_packed``.
    """
    batch = next(data_iterator)
    assert "old_logp" in batch, "the pack has no per-token reference log-probs (run reference_logprobs first)"
    ce_T, mask_T, packed, device = _token_ce(model, batch)
    logp_T = -ce_T
    old_T = batch["old_logp"][0].to(device)
    cu = packed.cu_seqlens_q_padded
    # CPU: the PyTorch reference (the Triton interpreter is far too slow for a training step).
    loss_N = mirror_descent_loss_packed(logp_T, old_T, mask_T, cu, batch["adv"].to(device), tau,
                                        backend="auto" if logp_T.is_cuda else "ref")

    def loss_func(_unused):
        valid = batch["valid"].to(device)
        with torch.no_grad():
            log_ratio = segment_sum(mask_T * (logp_T - old_T), cu)
        return _rl_report(loss_N * valid, valid, log_ratio)

    return loss_N, loss_func


def _logp_forward_step(data_iterator, model):
    batch = next(data_iterator)
    ce_T, mask_T, packed, _ = _token_ce(model, batch)
    logp_N = -segment_sum(ce_T * mask_T, packed.cu_seqlens_q_padded)
    token_logp = (-ce_T)[mask_T > 0]  # loss tokens in pack order: sample by sample
    return logp_N, lambda _o: (logp_N.sum() * 0.0, {"logp": logp_N.detach().clone(), "idx": batch["sample_index"],
                                                    "token_logp": token_logp.detach().clone()})


@torch.no_grad()
def reference_logprobs(model_chunks, microbatches: List[Dict], samples: Sequence[Sample],
                       seq_length: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """log π(y|x) of every sample under the current weights, on every rank ([N], float64), and the
    per-loss-token log-probs of each sample (fp32 [loss_token_count(sample)])."""
    for m in model_chunks:
        m.eval()
    out = get_forward_backward_func()(
        forward_step_func=_logp_forward_step, data_iterator=iter(microbatches), model=model_chunks[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=1, forward_only=True,
    )
    for m in model_chunks:
        m.train()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    counts = [loss_token_count(s) for s in samples]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    full = torch.zeros(len(samples), dtype=torch.float64, device=device)
    tokens = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    for rec in out or []:
        idx = rec["idx"]
        keep = idx >= 0
        full[idx[keep].to(device)] = rec["logp"][keep.to(rec["logp"].device)].double().to(device)
        mine = idx[keep].tolist()
        parts = rec["token_logp"].to(device).split([counts[i] for i in mine])
        for i, part in zip(mine, parts):
            tokens[offsets[i]:offsets[i + 1]] = part
    dist.all_reduce(full, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
    tokens = tokens.cpu()
    return full.cpu(), [tokens[offsets[i]:offsets[i + 1]].clone() for i in range(len(samples))]


def make_rl_forward_step(loss: str, tau: float, logprob_impl: str = "megatron"):
    """The forward step for ``rl.loss`` / ``rl.logprob_impl``: the packed mirror-descent kernel for
    (mirror_descent, fused), else the registry loss on per-sample sums. The model's LM head is chosen
    separately (the builder's ``lm_head_impl``, from the same ``rl.logprob_impl``)."""
    if loss == "mirror_descent" and logprob_impl == "fused":
        return partial(rl_forward_step_packed_md, tau=tau)
    return partial(rl_forward_step, loss_fn=get_loss(loss), tau=tau)
