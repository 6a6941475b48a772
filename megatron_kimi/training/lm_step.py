"""Causal-LM forward step for Megatron's pipeline schedules (per-token loss over the global batch).

The loss function returns ``(sum of masked token losses, number of masked tokens, report)``;
with ``config.calculate_per_token_loss`` Megatron neither divides by the micro-batch count nor
averages over DP, and ``finalize_model_grads`` divides the grads by the token count all-reduced
over DP x CP. So the gradient is that of the mean loss over every loss token of the global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator

import torch


def _loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    mask = loss_mask_BS.float()
    loss_sum = (output_BS.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    # clone: the schedule later divides the loss tensor in place.
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm_loss": report}


def lm_forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    """One micro-batch: tokens/labels/loss_mask/position_ids [b, s] -> per-token CE [b, s]."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    packed = batch.get("packed_seq_params")
    output_BS = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed)
    return output_BS, partial(_loss_func, loss_mask)


def reduce_reports(reports: list, key: str = "lm_loss") -> torch.Tensor:
    """Sum the [loss_sum, tokens] reports of this rank's micro-batches."""
    if not reports:
        return torch.zeros(2, dtype=torch.float64)
    return torch.stack([r[key].double() for r in reports]).sum(0)
