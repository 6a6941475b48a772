"""RL prompts: jsonl loading (errors name file:line), the embedded arithmetic set, prompt tokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np

from megatron_kimi.data.chat import tokenize_conversation
from megatron_kimi.data.chat_synth import is_heldout
from megatron_kimi.rl.types import Prompt

_FIELDS = {"prompt", "answer", "kind", "tests", "difficulty"}


def load_prompts(path: str | Path) -> List[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field 'prompt'")
            tests = obj.get("tests")
            if tests is not None and not (isinstance(tests, list) and all(isinstance(t, dict) for t in tests)):
                raise ValueError(f"{path}:{lineno}: 'tests' must be a list of objects")
            answer = obj.get("answer")
            out.append(Prompt(
                prompt=obj["prompt"], answer=None if answer is None else str(answer),
                kind=str(obj.get("kind", "math")), tests=tests, difficulty=obj.get("difficulty"),
                metadata={k: v for k, v in obj.items() if k not in _FIELDS},
            ))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def arithmetic_prompts(n: int, seed: int, heldout: bool) -> List[Prompt]:
    """``a+b=`` with a, b in 0..99 (the embedded demo task), scored by the exact-match reward.

    ``heldout`` picks from the held-out split (never in any training set), else from the rest.
    """
    rng = np.random.default_rng(seed)
    pool = [(a, b) for a in range(100) for b in range(100) if is_heldout(a, b) == heldout]
    if n > len(pool):
        raise ValueError(f"asked for {n} arithmetic prompts, the split has {len(pool)}")
    out, seen = [], set()
    while len(out) < n:
        a, b = pool[int(rng.integers(len(pool)))]
        q = f"{a}+{b}="
        if q in seen:
            continue
        seen.add(q)
        out.append(Prompt(prompt=q, answer=str(a + b), kind="exact", difficulty=float(len(str(a + b)))))
    return out


def prompt_token_ids(tokenizer, prompt: Prompt) -> List[int]:
    """The chat-formatted prompt up to and including the assistant's turn header."""
    messages = [{"role": "user", "content": prompt.prompt}, {"role": "assistant", "content": ""}]
    ids, mask = tokenize_conversation(tokenizer, messages)
    first = int(np.argmax(mask)) if mask.any() else len(ids)
    return [int(t) for t in ids[:first]]
