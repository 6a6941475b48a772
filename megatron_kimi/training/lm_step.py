"""Causal-LM forward step for Megatron's pipeline schedules (per-token loss over the global batch).

The loss function returns ``(sum of masked token losses, number of masked tokens, report)``;
with ``config.calculate_per_token_loss`` Megatron neither divides by the micro-batch count nor
averages over DP, and ``finalize_model_grads`` divides the grads by the token count all-reduced
over DP x CP. So the gradient is that of the mean loss over every loss token of the global batch.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Iterator

import torch
from megatron.core import parallel_state

from megatron_kimi.dpo.loss import REPORT_FIELDS as DPO_REPORT_FIELDS
from megatron_kimi.parallel.context import split_batch_for_cp


def _loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    mask = loss_mask_BS.float()
    loss_sum = (output_BS.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    # clone: the schedule later divides the loss tensor in place.
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm_loss": report}


def packed_to_device(params, device):
    """A copy of PackedSeqParams with its cu_seqlens tensors on ``device`` (None stays None)."""
    if params is None:
        return None
    moved = {f.name: getattr(params, f.name).to(device, non_blocking=True) for f in dataclasses.fields(params)
             if isinstance(getattr(params, f.name), torch.Tensor)}
    return dataclasses.replace(params, **moved)


def image_kwargs(batch, device) -> dict:
    """``images=`` for a VLM micro-batch with images (data/image_sft.py), else nothing."""
    images = batch.get("images")
    return {} if images is None else {"images": images.to(device)}


def lm_forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    """One micro-batch: tokens/labels/loss_mask/position_ids [b, s] -> per-token CE [b, s]."""
    batch = next(data_iterator)
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # this rank's zig-zag share of every packed sample
        batch = split_batch_for_cp(batch, cp, parallel_state.get_context_parallel_rank())
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    packed = packed_to_device(batch.get("packed_seq_params"), device)
    output_BS = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed, **image_kwargs(batch, device))
    return output_BS, partial(_loss_func, loss_mask)


# What the report tensor of each loss key holds, in order (one tensor: one all-reduce per step).
# ``loss_count`` is what the loss is averaged over: loss tokens (LM) or samples (RL).
REPORT_FIELDS = {"lm_loss": ("loss_sum", "loss_count"), "rl": ("loss_sum", "loss_count", "log_ratio_sum"),
                 "dpo": DPO_REPORT_FIELDS}  # loss_count: pairs (megatron_kimi/dpo/loss.py)


def report_width(key: str) -> int:
    return len(REPORT_FIELDS.get(key, REPORT_FIELDS["lm_loss"]))


def named_report(values, key: str = "lm_loss") -> Dict[str, float]:
    """A global report (:func:`~megatron_kimi.training.trainer.global_report`) by field name."""
    names = REPORT_FIELDS.get(key, REPORT_FIELDS["lm_loss"])
    assert len(values) == len(names), (key, len(values), names)
    return dict(zip(names, values))


def reduce_reports(reports: list, key: str = "lm_loss") -> torch.Tensor:
    """Sum the [loss_sum, tokens, ...] reports of this rank's micro-batches."""
    if not reports:
        return torch.zeros(report_width(key), dtype=torch.float64)
    return torch.stack([r[key].double() for r in reports]).sum(0)


def _logits_loss_func(logits_BSV: torch.Tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    full_BSV = gather_from_tensor_model_parallel_region(logits_BSV)  # vocab shards -> full vocab
    return logits_BSV.sum() * 0.0, {"logits": full_BSV.detach().clone()}


def logits_forward_step(data_iterator, model):
    """Forward-only micro-batch that reports the full-vocab logits [b, s, V_padded]."""
    batch = next(data_iterator)
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # this rank's zig-zag share of every packed sample
        batch = split_batch_for_cp(batch, cp, parallel_state.get_context_parallel_rank())
    device = next(model.parameters()).device
    logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), None,
                   packed_seq_params=packed_to_device(batch.get("packed_seq_params"), device),
                   **image_kwargs(batch, device))
    return logits, _logits_loss_func


@torch.no_grad()
def forward_logits(model_chunks, microbatches, seq_length: int):
    """Logits for each micro-batch on the last pipeline stage (None on other stages)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = [iter(microbatches) for _ in model_chunks] if len(model_chunks) > 1 else iter(microbatches)
    out = get_forward_backward_func()(
        forward_step_func=logits_forward_step,
        data_iterator=data,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [o["logits"] for o in out]
