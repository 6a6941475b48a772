"""The embedded SFT demo set: chat conversations about multi-operand addition.

Operand counts are long-tailed (2 is common, 6 rare), so sample lengths vary the way real SFT data
does; with ``long_cot`` the assistant writes out every partial sum (a miniature long-CoT set).

``carry_slip`` makes the teacher imperfect in one systematic way (the RL demo's warm-up data): with
that probability a two-operand answer whose ones digits carry is written without the carry (38+45=73).
A model that imitates this teacher well puts the wrong answer first on every carry problem, yet gives
the right one real probability, which is exactly what RL with a verifier can fix; so the demo's
headroom comes from the data, not from stopping SFT at a lucky moment.

``checks`` makes plain answers verbose at a varying length (the whole-recipe demo's long-CoT warm-up,
slurm/recipe.sh): ``a+b=S``, then 0..``checks`` redundant ``check: b+a=S`` lines (uniform), then
``answer: S``. The checks never change the answer (a slipped S is slipped in every line), so they are
pure length, like the re-verification long2short removes from a long-CoT model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

_OPERAND_P = np.array([0.45, 0.25, 0.15, 0.1, 0.05])  # 2..6 operands


def is_heldout(a: int, b: int) -> bool:
    """Two-operand problems kept out of every training set (the RL demo's held-out split: 983 of the
    10,000 pairs).

    A hash, not a digit rule: an earlier rule (b's last digit is 7) made the held-out set a test of
    generalizing to a digit never seen in that place, which a 2-layer model passes or fails depending
    on float noise; a pseudo-random split makes held-out problems like the training ones.
    """
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 7


def _problem(rng: np.random.Generator, long_cot: bool, operands: int = 0,
             carry_slip: float = 0.0, checks: int = 0) -> tuple[str, str, int]:
    k = operands or int(rng.choice(np.arange(2, 7), p=_OPERAND_P))
    xs = [int(x) for x in rng.integers(0, 100, size=k)]
    while k == 2 and is_heldout(*xs):
        xs = [int(x) for x in rng.integers(0, 100, size=k)]
    question = "+".join(map(str, xs)) + "="
    if not long_cot:
        total = sum(xs)
        # drawn only when slipping is on, so carry_slip=0 writes the same data as before it existed
        if carry_slip > 0 and k == 2 and xs[0] % 10 + xs[1] % 10 >= 10 and rng.random() < carry_slip:
            total -= 10
        if checks:  # drawn only then, so checks=0 writes the same data as before it existed
            n = int(rng.integers(0, checks + 1))
            lines = [f"{question}{total}"] + [f"check: {'+'.join(map(str, xs[::-1]))}={total}"] * n
            return question, "\n".join(lines + [f"answer: {total}"]), k
        return question, str(total), k
    steps, acc = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{acc}+{x}={acc + x}")
        acc += x
    return question, "\n".join(steps) + f"\nanswer: {acc}", k


def generate_chat_arithmetic(path: str | Path, num_samples: int, seed: int, long_cot: bool = False,
                             operands: int = 0, multi_turn: bool = True, carry_slip: float = 0.0,
                             checks: int = 0) -> Path:
    """Write ``num_samples`` chat lines; ~20% have a system prompt, ~20% two user turns.

    ``operands``: 0 = long-tailed 2..6 operands, n = always n. Held-out pairs (:func:`is_heldout`)
    never appear. ``carry_slip`` and ``checks``: see the module docstring (plain answers only).
    """
    if not 0.0 <= carry_slip <= 1.0:
        raise ValueError(f"carry_slip must be in [0, 1], got {carry_slip}")
    if checks < 0 or (checks and long_cot):
        raise ValueError(f"checks must be >= 0 and only with plain answers (long_cot=False), got {checks}")
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(num_samples):
            messages = []
            if multi_turn and rng.random() < 0.2:
                messages.append({"role": "system", "content": "Add the numbers."})
            turns = 2 if multi_turn and rng.random() < 0.2 else 1
            difficulty = 0
            for _ in range(turns):
                q, a, k = _problem(rng, long_cot, operands, carry_slip, checks)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                difficulty = max(difficulty, k)
            f.write(json.dumps({"messages": messages, "source": "builtin", "difficulty": difficulty}) + "\n")
    return out
