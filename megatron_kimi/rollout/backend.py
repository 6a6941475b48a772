"""The rollout backend protocol: what the RL loop needs from a generation engine.

The built-in :class:`~megatron_kimi.rollout.engine.GenerationEngine` implements it; an external
engine (vLLM, SGLang) would too. Lifecycle, as the RL loop drives it (``megatron_kimi/rl/loop.py``)::

    resume(["weights"]); update_weights(model); resume(["kv_cache"])   # before the first generation
    every iteration:
        generate(requests)                   # the iteration's samples
        release()                            # free the weights' copy and the KV cache for training
        ... the optimizer steps ...
        resume(["weights"])                  # the weights' memory first (vLLM: wake_up(tags=["weights"])),
        update_weights(model)                #   then the new weights into it,
        resume(["kv_cache"])                 #   then the KV cache: the peak never holds both a stale
        [generate(requests)]                 #   copy and the cache (held-out evaluation, when due)
    close()

``generate`` is only called while everything is resumed, ``update_weights`` while the weights are
(never into a sleeping engine). ``resume()`` without tags resumes everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # engine.py imports this module (the tags)
    from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult


WEIGHTS, KV_CACHE = "weights", "kv_cache"
TAGS = (WEIGHTS, KV_CACHE)

# The finish reason of a request a backend gave up on (a remote engine that failed or timed out on it
# after its retries): no tokens. The RL loop never trains on it (rl/generation.py) and counts it.
DROPPED = "dropped"


def check_tags(tags: Optional[Sequence[str]]) -> frozenset:
    """The tags of a ``resume(tags)`` call (None: all of them)."""
    out = frozenset(TAGS if tags is None else tags)
    if not out or not out <= set(TAGS):
        raise ValueError(f"resume tags must be a non-empty subset of {TAGS}, got {tags!r}")
    return out


@runtime_checkable
class RolloutBackend(Protocol):
    weight_version: int  # how many update_weights calls the engine took
    def generate(self, requests: Sequence[GenerationRequest],
                 on_result: Optional[Callable[[GenerationResult], None]] = None) -> List[GenerationResult]:
        """One result per request, same order. Every rank of a tensor-parallel group passes the same requests.

        ``on_result(result)``, when given, is called once per request with its final result (never changed
        afterwards): as soon as it is finished where the engine streams (the built-in one), or for every
        result at the end where it does not (vLLM). The RL loop scores finished samples from it."""

    def update_weights(self, model) -> None:
        """Take the trainer's current weights (``model``: its chunks)."""

    def release(self) -> None:
        """Free generation memory (KV cache, and an engine's own copy of the weights) while the trainer runs."""

    def resume(self, tags: Optional[Sequence[str]] = None) -> None:
        """Restore what :meth:`release` freed: ``tags`` of ``("weights", "kv_cache")`` (None: both)."""

    def close(self) -> None:
        """Free everything; the backend is not used again."""
