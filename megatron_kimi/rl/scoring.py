"""Task rewards of samples: :func:`score` (all at once, after generation) and :class:`AsyncScorer`
(each sample as soon as it is finished, in a thread pool, while the engine generates the rest).

Both set ``Sample.correct`` and ``Sample.reward_parts = {"task": score}`` through
:func:`~megatron_kimi.rl.rewards.call_reward`, so a reward that raises or hangs scores 0 and is counted
(``reward_errors``, ``reward_timeouts``) in the same way. Where they differ:

* :func:`score` makes one batched call per reward kind, each within ``rl.reward_timeout_s``: a hang
  times out every sample of its kind.
* :class:`AsyncScorer` (``rl.async_scoring``) makes one call per :meth:`~AsyncScorer.submit` (the RL loop
  submits one finished sample at a time), at most ``rl.scoring_workers`` at once. A hang then costs
  only its own sample; and since the calls queued behind a hang would otherwise wait for it, everything
  still running or queued when generation ends (:meth:`~AsyncScorer.wait`) must be done within one
  ``reward_timeout_s`` from then; a call that starts too late scores its samples 0 as timeouts. Each
  call still runs a batched reward (the code sandbox's ``max_concurrency`` is per call, so up to
  ``scoring_workers`` times as many sandbox runs can be in flight as with :func:`score`).

Where the scoring runs, and how every rank gets the same rewards, is the RL loop's business
(rl/generation.py, rl/loop.py).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_kimi.rl.rewards import RewardFn, RewardInput, RewardOutput, call_reward, get_reward
from megatron_kimi.rl.types import Sample

__all__ = ["score", "AsyncScorer"]


def score(samples: Sequence[Sample], reward_override: Optional[str], timeout_s: float = 300.0) -> Dict[str, int]:
    """Task reward per sample (grouped by reward kind, one batched call each, within ``timeout_s``).

    A reward that raises or hangs scores its samples 0; returns how many (``reward_errors``,
    ``reward_timeouts``). An unknown reward name is still an error (a config mistake)."""
    counts = _zero_counts()
    for kind, group in _by_kind(samples, reward_override).items():
        outs, errors, timeouts = call_reward(get_reward(kind), _inputs(group, kind), timeout_s, kind)
        counts["reward_errors"] += errors
        counts["reward_timeouts"] += timeouts
        _apply(group, outs)
    return counts


class AsyncScorer:
    """Scores samples in a background thread pool (see the module docstring).

    ``submit(samples)`` returns at once; ``wait()`` blocks until everything submitted since the last
    ``wait()`` is scored and returns its error / timeout counts (``last_wait_s``: how long it blocked).
    Only the thread that submits and waits may read the submitted samples' scores, after ``wait()``.
    """

    def __init__(self, reward_override: Optional[str], timeout_s: float = 300.0, workers: int = 4):
        if workers < 1:
            raise ValueError(f"scoring workers must be >= 1, got {workers}")
        self.reward_override = reward_override
        self.timeout_s = float(timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self._futures: List[Future] = []
        # monotonic time by which every call must be done: set by wait(), none before (a call made during
        # generation gets the whole timeout_s)
        self._deadline = math.inf
        self.last_wait_s = 0.0

    def submit(self, samples: Sequence[Sample]) -> None:
        """Start the task rewards of ``samples`` (one call per reward kind among them). An unknown
        reward name raises here, in the caller."""
        for kind, group in _by_kind(samples, self.reward_override).items():
            self._futures.append(self._pool.submit(self._score, get_reward(kind), kind, group))

    def wait(self) -> Dict[str, int]:
        """Block until the submitted samples are scored (at most about ``timeout_s`` for what still runs);
        their ``reward_errors`` / ``reward_timeouts``."""
        t0 = time.perf_counter()
        self._deadline = time.monotonic() + self.timeout_s
        counts = _zero_counts()
        try:
            for f in self._futures:
                errors, timeouts = f.result()
                counts["reward_errors"] += errors
                counts["reward_timeouts"] += timeouts
        finally:
            self._futures = []
            self._deadline = math.inf
            self.last_wait_s = time.perf_counter() - t0
        return counts

    def close(self) -> None:
        """Stop the pool's threads once idle (a reward call left behind by a timeout is not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _score(self, fn: RewardFn, kind: str, samples: List[Sample]) -> Tuple[int, int]:
        left = min(self.timeout_s, self._deadline - time.monotonic())
        if left <= 0:  # queued behind slow calls past wait()'s deadline
            outs, errors, timeouts = [RewardOutput(0.0, False, {"error": "timeout"}) for _ in samples], 0, len(samples)
        else:
            outs, errors, timeouts = call_reward(fn, _inputs(samples, kind), left, kind)
        _apply(samples, outs)
        return errors, timeouts


def _zero_counts() -> Dict[str, int]:
    return {"reward_errors": 0, "reward_timeouts": 0}


def _by_kind(samples: Sequence[Sample], reward_override: Optional[str]) -> Dict[str, List[Sample]]:
    by_kind: Dict[str, List[Sample]] = {}
    for s in samples:
        by_kind.setdefault(reward_override or s.prompt.kind, []).append(s)
    return by_kind


def _inputs(samples: Sequence[Sample], kind: str) -> List[RewardInput]:
    return [RewardInput(prompt=s.prompt.prompt, response=s.response, answer=s.prompt.answer, kind=kind,
                        tests=s.prompt.tests, metadata=s.prompt.metadata) for s in samples]


def _apply(samples: Sequence[Sample], outs: Sequence[RewardOutput]) -> None:
    for s, o in zip(samples, outs):
        s.correct = bool(o.correct)
        s.reward_parts = {"task": float(o.score)}
