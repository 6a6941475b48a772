"""Megatron optimizer (AdamW, optionally the distributed optimizer) and the LR schedule."""

from __future__ import annotations

from typing import Callable, List

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_kimi.config import OptimizerConfig, ParallelConfig, PrecisionConfig


def build_optimizer(chunks: List, opt: OptimizerConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """AdamW with decoupled weight decay over the DDP-wrapped ``chunks``."""
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    if torch.cuda.is_available():
        use_fused_torch_adam(optimizer)
    return optimizer


def use_fused_torch_adam(optimizer) -> int:
    """Switch torch AdamW/Adam (Megatron's choice without TE or apex) to its fused kernel; returns how
    many inner optimizers were switched.

    Unset, torch takes its multi-tensor (``foreach``) path: several passes over every parameter, moment
    and gradient per step; ``fused`` is one kernel. Same math (it is also torch's own implementation), so
    only on CUDA, where it pays: CPU runs keep the numbers they were measured with.
    """
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.AdamW, torch.optim.Adam):
            continue  # TE's / apex's FusedAdam already is one kernel
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, None
        inner.defaults["fused"], inner.defaults["foreach"] = True, None
        switched += 1
    return switched


def build_scheduler(optimizer, opt: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine/linear/constant to ``min_lr``.

    One scheduler step = one optimizer step. Megatron's param groups carry their own ``max_lr``/
    ``min_lr`` (taken from the optimizer config), which the scheduler prefers over its own: they are
    set here, so a new stage's schedule (multi-stage SFT) really takes effect.
    """
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = opt.lr, opt.min_lr
    decay_steps = opt.decay_steps if opt.decay_steps is not None else max(total_steps, opt.warmup_steps + 1)
    decay_steps = max(decay_steps, opt.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.warmup_steps > 0 else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def move_optimizer_state(optimizer, move: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Replace every tensor of the optimizer's per-parameter state (Adam's moments, step counters) by
    ``move(tensor)``; returns the bytes moved.

    The parameters themselves stay: with the distributed optimizer over fp32 parameters, the
    optimizer's parameters are views into the model's (an update through them is the model's update),
    and a copy elsewhere would cut that link. The moments are the bulk (2 × 4 bytes per parameter).
    """
    nbytes = 0
    for opt in inner_optimizers(optimizer):
        for state in opt.state.values():
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[key] = move(v)
                    nbytes += v.numel() * v.element_size()
    return nbytes


def to_pinned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy in pinned memory (an asynchronous copy back to the GPU later)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
