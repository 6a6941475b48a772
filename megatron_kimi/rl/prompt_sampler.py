"""Which prompts an RL iteration trains on: uniform, curriculum, or prioritized (Kimi k1.5 §2.3.4).

* ``uniform`` -- ``n`` distinct prompts, uniformly (the default; what the demo uses).
* ``curriculum`` -- prompts carry a ``difficulty`` (higher = harder: a label, or ``1 - pass rate`` from
  ``megatron-kimi difficulty``). Before ``curriculum_switch_iteration`` only the easiest
  ``curriculum_easy_fraction`` of the prompts are drawn; from it on, all of them. (The paper starts
  "with easier tasks and gradually progresses"; one switch is the simplest schedule that does that.)
* ``prioritized`` -- the success rate ``s_i`` of each prompt (its mean reward-is-correct over every
  sample it has had so far; 0 before it was ever tried) sets ``P(i) ∝ (1 - s_i) + priority_floor``:
  prompts the policy still fails come back more, solved ones keep a small chance (the floor), so a
  success rate measured early can still be revised.

Draws come from a generator per (seed, iteration) (no RNG state to checkpoint: a resumed run draws the
same prompts given the same statistics); the success counts are the sampler's state and go into the
RL checkpoint (:meth:`state_dict`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_kimi.rl.types import Prompt

STRATEGIES = ("uniform", "curriculum", "prioritized")
_LABELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


def difficulty_value(difficulty) -> Optional[float]:
    """A prompt's difficulty as a number (higher = harder); labels easy / medium / hard map to 0 / 0.5 / 1."""
    if difficulty is None:
        return None
    if isinstance(difficulty, str):
        if difficulty.strip().lower() in _LABELS:
            return _LABELS[difficulty.strip().lower()]
        try:
            return float(difficulty)
        except ValueError:
            raise ValueError(f"difficulty {difficulty!r}: expected a number or one of {sorted(_LABELS)}") from None
    return float(difficulty)


class PromptSampler:
    """Draws each iteration's prompt indices and tracks per-prompt success rates."""

    def __init__(self, prompts: Sequence[Prompt], strategy: str = "uniform", seed: int = 0,
                 curriculum_switch_iteration: int = 0, curriculum_easy_fraction: float = 0.5,
                 priority_floor: float = 0.05):
        if strategy not in STRATEGIES:
            raise ValueError(f"data.sampling must be one of {STRATEGIES}, got {strategy!r}")
        if not prompts:
            raise ValueError("no prompts to sample from")
        if not 0.0 < curriculum_easy_fraction <= 1.0:
            raise ValueError(f"data.curriculum_easy_fraction must be in (0, 1], got {curriculum_easy_fraction}")
        if priority_floor < 0.0:
            raise ValueError(f"data.priority_floor must be >= 0, got {priority_floor}")
        if strategy == "prioritized" and priority_floor == 0.0:
            # with s_i = 1 everywhere every weight would be 0
            raise ValueError("data.priority_floor must be > 0 for prioritized sampling")
        self.strategy = strategy
        self.seed = seed
        self.n_prompts = len(prompts)
        self.switch = curriculum_switch_iteration
        self.floor = priority_floor
        self.attempts = np.zeros(self.n_prompts, dtype=np.int64)
        self.successes = np.zeros(self.n_prompts, dtype=np.float64)
        self.easy: Optional[np.ndarray] = None
        if strategy == "curriculum":
            values = []
            for i, p in enumerate(prompts):
                v = difficulty_value(p.difficulty)
                if v is None:
                    raise ValueError(f"data.sampling=curriculum: prompt {i} ({p.prompt[:40]!r}) has no 'difficulty'; "
                                     "label every prompt or run `megatron-kimi difficulty CONFIG` first")
                values.append(v)
            order = np.argsort(np.asarray(values), kind="stable")  # ties keep file order
            self.easy = np.sort(order[: max(1, int(round(curriculum_easy_fraction * self.n_prompts)))])

    # ---- drawing ------------------------------------------------------------------------------
    def weights(self, iteration: int) -> np.ndarray:
        """The probability of each prompt at ``iteration`` (for one draw; ``sample`` draws without
        replacement in proportion to these)."""
        w = np.ones(self.n_prompts)
        if self.strategy == "curriculum" and iteration < self.switch:
            w = np.zeros(self.n_prompts)
            w[self.easy] = 1.0
        elif self.strategy == "prioritized":
            w = (1.0 - self.success_rate()) + self.floor
        return w / w.sum()

    def sample(self, n: int, iteration: int) -> List[int]:
        """Iteration ``iteration``'s ``n`` distinct prompt indices (all eligible ones if fewer)."""
        # A generator per (seed, iteration): x7919 (a prime above any iteration count) keeps the streams of
        # different seeds apart; the uniform stream is the one the demo has always drawn.
        rng = np.random.default_rng(self.seed * 7919 + iteration)
        p = self.weights(iteration)
        eligible = int(np.count_nonzero(p))
        if self.strategy == "uniform":
            return [int(i) for i in rng.choice(self.n_prompts, size=min(n, self.n_prompts), replace=False)]
        return [int(i) for i in rng.choice(self.n_prompts, size=min(n, eligible), replace=False, p=p)]

    # ---- feedback -----------------------------------------------------------------------------
    def update(self, prompt_index: Sequence[int], correct: Sequence[float]) -> None:
        """One entry per finished sample: its prompt and whether it was right (1.0 / 0.0, or a rate)."""
        idx = np.asarray(prompt_index, dtype=np.int64)
        np.add.at(self.attempts, idx, 1)
        np.add.at(self.successes, idx, np.asarray(correct, dtype=np.float64))

    def success_rate(self) -> np.ndarray:
        return np.divide(self.successes, self.attempts, out=np.zeros(self.n_prompts), where=self.attempts > 0)

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {"strategy": self.strategy, "n_prompts": self.n_prompts, "attempts": self.attempts.tolist(),
                "successes": self.successes.tolist()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state.get("n_prompts") != self.n_prompts:
            raise ValueError(f"the checkpoint's prompt sampler tracked {state.get('n_prompts')} prompts, this run has "
                             f"{self.n_prompts}: resume with the same data.prompts")
        self.attempts = np.asarray(state["attempts"], dtype=np.int64)
        self.successes = np.asarray(state["successes"], dtype=np.float64)
