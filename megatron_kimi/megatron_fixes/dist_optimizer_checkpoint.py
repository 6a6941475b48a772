"""Distributed-optimizer checkpoint fixes, for Megatron-Core 0.16.1 without TE/Apex (torch Adam).

Upstream behaviour worked around here (each pinned by tests/megatron_fixes/test_upstream_pins.py):

(a) The default sharding format ``fully_sharded_model_space`` fails at save ("ShardedTensor.
    flattened_range is not supported"): ``training/checkpoint.py`` always passes
    ``metadata={"distrib_optim_sharding_type": "fully_reshardable"}`` (reshards over TP/PP/DP).
(b) A fresh torch Adam has no state, and building the *load* state dict asserts on it:
    :func:`ensure_state_initialized` runs Megatron's dummy step first.
(c) Copying the loaded state back (``_set_main_param_and_optimizer_states``) iterates over the
    *destination* keys, which include torch Adam's ``step`` that the checkpoint stores per group,
    not per param -> ``KeyError: 'step'``: :func:`load_optimizer_state` copies only the keys both
    sides have, under ``no_grad``.
(d) Silent wrong resume: ``load_state_dict`` puts ONE ``step`` tensor into every param's state;
    torch Adam increments it in place once per param per step, so the bias correction is wrong
    after a resume. :func:`load_optimizer_state` gives every param its own copy.
"""

from __future__ import annotations

import types

import torch

UPSTREAM_VERSION = "0.16.1"


def _leaves(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def ensure_state_initialized(optimizer) -> None:
    """(b): allocate Adam state with Megatron's dummy step if the optimizer never stepped.

    The dummy step runs with lr=0 so that decoupled weight decay leaves the params untouched.
    """
    for opt in _leaves(optimizer):
        if _is_distributed(opt) and len(opt.optimizer.state) == 0:
            groups = opt.optimizer.param_groups
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = 0.0
            try:
                opt._init_optimizer_states_with_dummy_values()
            finally:
                for g, lr in zip(groups, saved):
                    g["lr"] = lr


def _set_common_keys(self, model_param, tensors) -> None:
    """(c): upstream's copy for the plain torch-optimizer path, over the keys both sides have."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key in dst.keys() & tensors.keys():
            dst[key].copy_(tensors[key])


def unshare_step_tensors(optimizer) -> int:
    """(d): give each param state its own ``step`` tensor; returns how many were shared."""
    shared = 0
    for opt in _leaves(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        seen = set()
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    shared += 1
                state["step"] = step.detach().clone()
                seen.add(id(step))
    return shared


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` with fixes (c) and (d) applied."""
    patched = []
    for opt in _leaves(optimizer):
        if _is_distributed(opt) and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            opt._set_main_param_and_optimizer_states = types.MethodType(_set_common_keys, opt)
            patched.append(opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    unshare_step_tensors(optimizer)
