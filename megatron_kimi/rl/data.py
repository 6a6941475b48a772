"""RL prompts: jsonl loading (errors name file:line), the embedded arithmetic set, the training and
held-out sets of a run, prompt tokenization. (Which of them an iteration trains on: rl/prompt_sampler.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch.distributed as dist

from megatron_kimi.data.chat import tokenize_conversation
from megatron_kimi.data.chat_synth import is_heldout
from megatron_kimi.data.jsonl import BadLines, read_jsonl
from megatron_kimi.rl.types import Prompt

_FIELDS = {"prompt", "answer", "kind", "tests", "difficulty", "images"}


# Built-in rewards that score against a reference: a prompt for them without one could only ever
# score 0, silently, so it is a bad line.
_NEEDS_ANSWER = ("math", "exact")


def parse_prompt(obj, reward: Optional[str]) -> Prompt:
    """One jsonl object -> :class:`Prompt` (``ValueError`` saying what is wrong; the reader adds file:line).
    Shared by the RL run and ``megatron-kimi difficulty``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError("expected an object with a string field 'prompt'")
    tests = obj.get("tests")
    if tests is not None and not (isinstance(tests, list) and all(isinstance(t, dict) for t in tests)):
        raise ValueError("'tests' must be a list of objects")
    kind = obj.get("kind", "math")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"'kind' must be a reward name, got {kind!r}")
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, (dict, list)) or not str(answer).strip()):
        raise ValueError(f"'answer' must be a non-empty string or number, got {answer!r}")
    images = obj.get("images")
    if images is not None and not (isinstance(images, list) and images and all(isinstance(i, str) for i in images)):
        raise ValueError("'images' must be a non-empty list of strings (paths or base64)")
    scored_by = reward or kind
    if scored_by in _NEEDS_ANSWER and answer is None:
        raise ValueError(f"no 'answer' (the {scored_by!r} reward compares against it)")
    if scored_by == "code" and not tests:
        raise ValueError("no 'tests' (the 'code' reward runs them)")
    return Prompt(prompt=obj["prompt"], answer=None if answer is None else str(answer), kind=kind, tests=tests,
                  difficulty=obj.get("difficulty"), metadata={k: v for k, v in obj.items() if k not in _FIELDS},
                  images=images)


def load_prompts(path: str | Path, on_error: str = "raise", bad: Optional[BadLines] = None,
                 reward: Optional[str] = None) -> List[Prompt]:
    """Prompts from a jsonl file. A bad line (malformed, non-UTF-8, truncated, no string 'prompt', no
    'answer' for a reward that needs one, no 'tests' for code) raises ``ValueError("PATH:LINE: ...")``,
    or with ``on_error="skip"`` is counted in ``bad``. ``reward`` is ``data.reward`` (it overrides
    every prompt's ``kind``). A file without prompts is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    out = with_image_dir([p for _, p in read_jsonl(path, lambda obj: parse_prompt(obj, reward), on_error, bad)],
                         path)
    if not out:
        skipped = f", {bad.count} bad line(s) skipped" if bad is not None and bad.count else ""
        raise ValueError(f"{path}: no prompts (empty dataset{skipped})")
    return out


def with_image_dir(prompts: List[Prompt], path: str | Path) -> List[Prompt]:
    """Image prompts of the file ``path`` remember its folder: their relative image paths are relative to it."""
    for p in prompts:
        if p.images:
            p.metadata.setdefault("image_dir", str(Path(path).resolve().parent))
    return prompts


def builtin_train_prompts(spec: str, seed: int) -> Optional[List[Prompt]]:
    """A run's training prompts for a ``builtin:`` spec (None: not a built-in set)."""
    from megatron_kimi.rl.images import BUILTIN_IMAGE_PROMPTS, image_count_prompts

    if spec == BUILTIN:
        return arithmetic_prompts(4000, seed, heldout=False)
    if spec == BUILTIN_IMAGE_PROMPTS:
        return image_count_prompts(2000, seed)
    return None


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


BUILTIN = "builtin:arithmetic"


def _load_prompts_reporting(path: str, cfg) -> List[Prompt]:
    bad = BadLines(path)
    prompts = load_prompts(path, on_error=cfg.data.on_error, bad=bad, reward=cfg.data.reward)
    if bad.count and dist.get_rank() == 0:
        print(f"rl: {bad.summary()}", flush=True)
    return prompts


def load_prompt_sets(cfg) -> Tuple[List[Prompt], List[Prompt]]:
    """(training prompts, held-out prompts) of an RL run (``cfg``: an RLConfig): ``data.eval_prompts``,
    else a disjoint built-in set, else the last ``data.eval_size`` prompts of the file."""
    from megatron_kimi.rl.images import BUILTIN_IMAGE_PROMPTS, image_count_prompts

    d = cfg.data
    train = builtin_train_prompts(d.prompts, cfg.training.seed) or _load_prompts_reporting(d.prompts, cfg)
    if d.eval_prompts:
        held = _load_prompts_reporting(d.eval_prompts, cfg)
    elif d.prompts == BUILTIN:  # seed + 1: not the training set's stream (the splits are disjoint anyway)
        held = arithmetic_prompts(d.eval_size, cfg.training.seed + 1, heldout=True)
    elif d.prompts == BUILTIN_IMAGE_PROMPTS:  # other random images (seed + 1): none is a training image
        held = image_count_prompts(d.eval_size, cfg.training.seed + 1)
    else:
        held = train[-d.eval_size:]
        train = train[:-d.eval_size] or train
    return train, held[: d.eval_size]
