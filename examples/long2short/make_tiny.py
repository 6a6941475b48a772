"""Write the tiny long2short demo data next to this file (deterministic; the files are committed).

    python examples/long2short/make_tiny.py

* ``samples_tiny.jsonl``: what ``megatron-kimi sample`` writes, per prompt (two- or three-operand addition,
  the demo task) 6 samples with their correctness and length in tokens (the char tokenizer: one per
  character): short correct answers ("57"), long correct worked answers (the long-CoT style), wrong
  answers. A few prompts have no correct sample, a few no negative (only short correct ones): the pair
  builder skips and counts them.
* ``pairs_tiny.jsonl``: ``{"prompt", "chosen", "rejected"}`` pairs in the plain format (the shortest
  correct answer against a long worked one or a wrong one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def worked(xs) -> str:
    steps, acc = [], xs[0]
    for x in xs[1:]:
        steps.append(f"{acc}+{x}={acc + x}")
        acc += x
    return "let me add step by step\n" + "\n".join(steps) + f"\nso the answer is {acc}"


def main(num_prompts: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    samples_lines, pair_lines = [], []
    for i in range(num_prompts):
        xs = [int(x) for x in rng.integers(0, 100, size=2 + int(rng.random() < 0.3))]
        prompt, answer = "+".join(map(str, xs)) + "=", sum(xs)
        short, long_, wrong = str(answer), worked(xs), str(answer + int(rng.choice([-10, -1, 1, 10])))
        kind = i % 10
        if kind == 0:  # never right
            outs = [(wrong, False)] * 3 + [(str(answer + 2), False)] * 3
        elif kind == 1:  # always short and right: no negative
            outs = [(short, True)] * 6
        else:
            outs = [(long_, True), (short, True), (wrong, False), (long_, True), (short, True), (long_[:-1] + "0", False)]
            rng.shuffle(outs)
        samples = [{"response": r, "correct": bool(c), "tokens": len(r)} for r, c in outs]
        samples_lines.append({"prompt": prompt, "answer": str(answer), "samples": samples})
        if kind >= 2:
            pair_lines.append({"prompt": prompt, "chosen": short, "rejected": long_})
            pair_lines.append({"prompt": prompt, "chosen": short, "rejected": wrong})
    for name, lines in (("samples_tiny.jsonl", samples_lines), ("pairs_tiny.jsonl", pair_lines)):
        (HERE / name).write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
