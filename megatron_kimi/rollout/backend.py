"""The rollout backend protocol: what the RL loop needs from a generation engine.

The built-in :class:`~megatron_kimi.rollout.engine.GenerationEngine` implements it; an external
engine (vLLM, SGLang) would too. Lifecycle, as the RL loop drives it (``megatron_kimi/rl/loop.py``)::

    resume(); update_weights(model)          # once, before the first generation
    every iteration:
        generate(requests)                   # the iteration's samples
        release()                            # free the KV cache (and any other memory) for training
        ... the optimizer steps ...
        resume(); update_weights(model)      # restore memory, then the new weights
        [generate(requests)]                 # held-out evaluation, when due
    close()

``generate`` and ``update_weights`` are only called while resumed (not released).
"""

from __future__ import annotations

from typing import List, Protocol, Sequence, runtime_checkable

from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, requests: Sequence[GenerationRequest]) -> List[GenerationResult]:
        """One result per request, same order. Every rank of a tensor-parallel group passes the same requests."""

    def update_weights(self, model) -> None:
        """Take the trainer's current weights (``model``: its chunks)."""

    def release(self) -> None:
        """Free generation memory (KV cache) while the trainer runs."""

    def resume(self) -> None:
        """Restore what :meth:`release` freed."""

    def close(self) -> None:
        """Free everything; the backend is not used again."""
