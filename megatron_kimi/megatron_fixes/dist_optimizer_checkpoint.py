"""Distributed-optimizer checkpoint fixes for Megatron-Core 0.16.1 (without TE/Apex). WIP."""

from __future__ import annotations


def _leaves(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def ensure_state_initialized(optimizer) -> None:
    for opt in _leaves(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and len(inner.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state_dict) -> None:
    optimizer.load_state_dict(state_dict)
