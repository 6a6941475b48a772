"""The embedded SFT demo set: chat conversations about multi-operand addition.

Operand counts are long-tailed (2 is common, 6 rare), so sample lengths vary the way real SFT data
does; with ``long_cot`` the assistant writes out every partial sum (a miniature long-CoT set).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_OPERAND_P = np.array([0.45, 0.25, 0.15, 0.1, 0.05])  # 2..6 operands


def is_heldout(a: int, b: int) -> bool:
    """Two-operand problems kept out of every training set (the RL demo's held-out split, ~10%)."""
    return (a * 100 + b) % 10 == 7


def _problem(rng: np.random.Generator, long_cot: bool, operands: int = 0) -> tuple[str, str, int]:
    k = operands or int(rng.choice(np.arange(2, 7), p=_OPERAND_P))
    xs = [int(x) for x in rng.integers(0, 100, size=k)]
    while k == 2 and is_heldout(*xs):
        xs = [int(x) for x in rng.integers(0, 100, size=k)]
    question = "+".join(map(str, xs)) + "="
    if not long_cot:
        return question, str(sum(xs)), k
    steps, acc = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{acc}+{x}={acc + x}")
        acc += x
    return question, "\n".join(steps) + f"\nanswer: {acc}", k


def generate_chat_arithmetic(path: str | Path, num_samples: int, seed: int, long_cot: bool = False,
                             operands: int = 0, multi_turn: bool = True) -> Path:
    """Write ``num_samples`` chat lines; ~20% have a system prompt, ~20% two user turns.

    ``operands``: 0 = long-tailed 2..6 operands, n = always n. Held-out pairs (:func:`is_heldout`)
    never appear.
    """
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
                q, a, k = _problem(rng, long_cot, operands)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                difficulty = max(difficulty, k)
            f.write(json.dumps({"messages": messages, "source": "builtin", "difficulty": difficulty}) + "\n")
    return out
