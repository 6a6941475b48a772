"""Reward shaping for Kimi k1.5 RL: the length penalty (paper §2.3.3) and repeat detection.

Length penalty
--------------
For the k responses of one prompt with lengths ``len_i``::

    λ_i = 0.5 − (len_i − min_len) / (max_len − min_len)        (λ_i = 0 for all if max_len == min_len)
    term_i = w · λ_i            if response i is correct
             w · min(0, λ_i)    if it is wrong

so among correct answers short ones are rewarded and long ones penalised, and long wrong answers
are penalised.  The paper switches it on only after a warm-up (it slows training early on):
``length_penalty_active(iteration, warmup)`` (iterations counted from 0).

Repeat detection
----------------
A response "starts repeating" when its tail is a loop: a block of period ``p`` (1 ≤ p ≤
``max_period``) repeated at least ``min_repeats`` times back to back, the periodic tail covering at
least ``min_tokens`` tokens.  Defaults ``max_period=64, min_repeats=4, min_tokens=32``: catches a
single token repeated 32 times, a 10-token phrase 4 times (40 tokens), a 64-token sentence 4 times;
ignores short legitimate repetition such as ``"1 1 1"``, ``"====="``, or varied lines like
``"1+1=2\\n2+2=4\\n..."`` (never exactly periodic).  Raise ``max_period`` for paragraph-level loops
(cost is linear in it).

Incremental algorithm (what a decoder calls on every step): for each period p keep ``run[p]``, the
number of consecutive most-recent positions t with ``x[t] == x[t-p]``.  The longest p-periodic
suffix then has length ``run[p] + p``; the tail is a loop iff for some p
``run[p] + p >= max(min_repeats·p, min_tokens)``.  One update is O(max_period) time, memory
O(max_period) per sequence (a ring buffer of the last ``max_period`` tokens), independent of the
sequence length.  :class:`RepeatDetector` does one sequence in pure Python (the rollout engine runs
one per sequence); :func:`detect_repeat` / :func:`first_repeat_index` are the offline (whole sequence) versions and give
exactly what feeding the tokens one by one gives.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = [
    "length_penalty",
    "length_penalty_active",
    "RepeatDetector",
    "detect_repeat",
    "first_repeat_index",
    "DEFAULT_MAX_PERIOD",
    "DEFAULT_MIN_REPEATS",
    "DEFAULT_MIN_TOKENS",
]

DEFAULT_MAX_PERIOD = 64
DEFAULT_MIN_REPEATS = 4
DEFAULT_MIN_TOKENS = 32


# =============================================================================================
# length penalty
# =============================================================================================
def length_penalty(lengths: Sequence[int], correct: Sequence[bool], weight: float) -> List[float]:
    """The §2.3.3 length reward term ``w·λ_i`` (correct) / ``w·min(0, λ_i)`` (wrong) for one
    prompt's k responses; add it to the task reward."""
    if len(lengths) != len(correct):
        raise ValueError(f"lengths ({len(lengths)}) and correct ({len(correct)}) differ in size")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(float(weight) * (lam if ok else min(0.0, lam)))
    return out


def length_penalty_active(iteration: int, warmup_iterations: int) -> bool:
    """Off for the first ``warmup_iterations`` iterations (counted from 0), then on."""
    return iteration >= warmup_iterations


# =============================================================================================
# repeat detection
# =============================================================================================
def _thresholds(max_period: int, min_repeats: int, min_tokens: int) -> List[int]:
    """thr[p] = the run[p] needed for a loop of period p (index 0 unused)."""
    if max_period < 1 or min_repeats < 2:
        raise ValueError("need max_period >= 1 and min_repeats >= 2")
    return [0] + [max((min_repeats - 1) * p, min_tokens - p, 1) for p in range(1, max_period + 1)]


class RepeatDetector:
    """Incremental loop detector for one sequence: ``update(token) -> bool`` (tail is a loop now).

    ``triggered`` / ``first_index`` remember the first token at which a loop was detected.
    """

    __slots__ = ("max_period", "min_repeats", "min_tokens", "_thr", "_buf", "_run", "_n",
                 "triggered", "first_index")

    def __init__(self, max_period: int = DEFAULT_MAX_PERIOD, min_repeats: int = DEFAULT_MIN_REPEATS,
                 min_tokens: int = DEFAULT_MIN_TOKENS):
        self.max_period = int(max_period)
        self.min_repeats = int(min_repeats)
        self.min_tokens = int(min_tokens)
        self._thr = _thresholds(self.max_period, self.min_repeats, self.min_tokens)
        self.reset()

    def reset(self) -> None:
        self._buf = [None] * self.max_period  # ring of the last max_period tokens
        self._run = [0] * (self.max_period + 1)
        self._n = 0
        self.triggered = False
        self.first_index: Optional[int] = None

    def update(self, token: int) -> bool:
        n, P, buf, run, thr = self._n, self.max_period, self._buf, self._run, self._thr
        hit = False
        top = min(P, n)
        for p in range(1, top + 1):
            if buf[(n - p) % P] == token:
                r = run[p] + 1
                run[p] = r
                if r >= thr[p]:
                    hit = True
            else:
                run[p] = 0
        buf[n % P] = token
        self._n = n + 1
        if hit and not self.triggered:
            self.triggered, self.first_index = True, n
        return hit

    def extend(self, tokens: Sequence[int]) -> bool:
        """Feed several tokens; True if the tail is a loop after the last one."""
        hit = False
        for t in tokens:
            hit = self.update(t)
        return hit

    def __len__(self) -> int:
        return self._n


def first_repeat_index(token_ids: Sequence[int], max_period: int = DEFAULT_MAX_PERIOD,
                       min_repeats: int = DEFAULT_MIN_REPEATS,
                       min_tokens: int = DEFAULT_MIN_TOKENS) -> Optional[int]:
    """Index of the first token at which the sequence's tail is a loop (None if never)."""
    d = RepeatDetector(max_period, min_repeats, min_tokens)
    for i, t in enumerate(token_ids):
        if d.update(t):
            return i
    return None


def detect_repeat(token_ids: Sequence[int], max_period: int = DEFAULT_MAX_PERIOD,
                  min_repeats: int = DEFAULT_MIN_REPEATS, min_tokens: int = DEFAULT_MIN_TOKENS,
                  *, tail_only: bool = False) -> bool:
    """Whether the sequence ever entered a loop (``tail_only``: whether it ends in one)."""
    if tail_only:
        d = RepeatDetector(max_period, min_repeats, min_tokens)
        return d.extend(token_ids)
    return first_repeat_index(token_ids, max_period, min_repeats, min_tokens) is not None
