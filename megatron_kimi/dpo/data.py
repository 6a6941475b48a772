"""DPO pairs: read (pairs jsonl, or built from ``sample``'s output), tokenize once, cache.

Input formats (``data.pairs_from``), one JSON object per line:

* ``pairs``: ``{"prompt": P, "chosen": R, "rejected": R}``. ``P`` is a string (one user turn) or a
  list of chat messages (``{"role": "system"|"user"|"assistant", "content": str}``, ending with a user
  turn); ``R`` is a string or TRL's conversational form ``[{"role": "assistant", "content": str}]``.
* ``samples`` (what ``megatron-kimi sample`` writes: n samples per prompt with their correctness and
  length): ``{"prompt": P, "answer": ..., "samples": [{"response": str, "correct": bool, "tokens": int},
  ...]}``. Pairs by the long2short rule of Kimi k1.5 §2.4: the positive is the shortest correct sample
  (fewest ``tokens``; the first on a tie), the negatives are the wrong samples and the correct ones
  longer than ``dpo.length_ratio`` (1.5) x the positive; one pair (positive, negative) per negative in
  the file's order, at most ``dpo.max_pairs_per_prompt`` (0: all). A prompt with no correct sample or
  no negative gives no pair and is counted (``no_correct``, ``no_negative``). ``answer`` is not used.

A bad line (malformed JSON, a missing or mistyped field, a response the chat template cannot render)
is ``ValueError("PATH:LINE: FIELD: reason")``, or with ``data.on_error=skip`` left out and counted.

Tokenization is SFT's (megatron_kimi/data/chat.py): prompt + response as a conversation through the
tokenizer's chat template (or the built-in one); the loss mask covers the last assistant turn only
(the response, its end-of-turn and eos), so prompt tokens (earlier assistant turns included) are masked.
Rank 0 tokenizes into ``CACHE/dpo_pairs_<key>.npz`` (key: the file's bytes, the tokenizer files and
the pair-building settings); the other ranks read that file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_kimi.data.chat import ROLES, tokenize_conversation
from megatron_kimi.data.jsonl import BadLines, read_jsonl

CACHE_VERSION = "dpo-pairs-v1"


# ---- parsing ----------------------------------------------------------------------------------

def _type(v: Any) -> str:
    return type(v).__name__


def parse_prompt(value: Any, where: str = "prompt") -> List[Dict[str, str]]:
    """A prompt string (one user turn) or a list of chat messages ending with a user turn."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: empty string")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a string or a non-empty list of messages, got {_type(value)}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{j}]: expected {{\"role\": one of {list(ROLES)}, \"content\": str}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be a user turn, got {out[-1]['role']!r}")
    return out


def parse_response(value: Any, where: str) -> str:
    """A response string, or TRL's conversational ``[{"role": "assistant", "content": str}]``."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ValueError(f"{where}: expected a string (or [{{\"role\": \"assistant\", \"content\": str}}]), "
                     f"got {_type(value)}")


def _require(obj: Any, keys: Sequence[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with {what}, got {_type(obj)}")
    for k in keys:
        if k not in obj:
            raise ValueError(f"{k}: missing field")


def parse_pair(obj: Any) -> Tuple[List[Dict[str, str]], str, str]:
    """One ``pairs`` line -> (prompt messages, chosen, rejected)."""
    _require(obj, ("prompt", "chosen", "rejected"), "'prompt', 'chosen' and 'rejected'")
    return parse_prompt(obj["prompt"]), parse_response(obj["chosen"], "chosen"), parse_response(obj["rejected"], "rejected")


@dataclass
class SampleOut:
    response: str
    correct: bool
    tokens: int


def parse_samples_record(obj: Any) -> Tuple[List[Dict[str, str]], List[SampleOut]]:
    """One ``samples`` line -> (prompt messages, its samples)."""
    _require(obj, ("prompt", "samples"), "'prompt' and 'samples'")
    prompt = parse_prompt(obj["prompt"])
    samples = obj["samples"]
    if not isinstance(samples, list):
        raise ValueError(f"samples: expected a list, got {_type(samples)}")
    out = []
    for j, s in enumerate(samples):
        w = f"samples[{j}]"
        if not isinstance(s, dict):
            raise ValueError(f"{w}: expected an object, got {_type(s)}")
        for k in ("response", "correct", "tokens"):
            if k not in s:
                raise ValueError(f"{w}.{k}: missing field")
        if not isinstance(s["response"], str):
            raise ValueError(f"{w}.response: expected a string, got {_type(s['response'])}")
        if not isinstance(s["correct"], bool):
            raise ValueError(f"{w}.correct: expected true/false, got {s['correct']!r}")
        if isinstance(s["tokens"], bool) or not isinstance(s["tokens"], int) or s["tokens"] < 0:
            raise ValueError(f"{w}.tokens: expected a non-negative integer, got {s['tokens']!r}")
        out.append(SampleOut(s["response"], s["correct"], s["tokens"]))
    return prompt, out


def long2short_pairs(samples: Sequence[SampleOut], length_ratio: float = 1.5,
                     max_pairs: int = 0) -> Tuple[Optional[int], List[int], Optional[str]]:
    """The paper's rule on one prompt's samples: (positive index, negative indices, None), or
    (None, [], reason) with reason ``"no_correct"`` / ``"no_negative"``.

    Positive: the shortest correct sample (the first of equal length). Negatives: every wrong sample and
    every correct one with ``tokens > length_ratio * positive.tokens``, in order, the first ``max_pairs``
    (0: all)."""
    correct = [i for i, s in enumerate(samples) if s.correct]
    if not correct:
        return None, [], "no_correct"
    pos = min(correct, key=lambda i: (samples[i].tokens, i))
    limit = length_ratio * samples[pos].tokens
    negs = [i for i, s in enumerate(samples) if not s.correct or s.tokens > limit]
    if not negs:
        return None, [], "no_negative"
    return pos, negs[:max_pairs] if max_pairs > 0 else negs, None


# ---- tokenization -----------------------------------------------------------------------------

def response_mask(mask: np.ndarray) -> np.ndarray:
    """The loss mask of the last assistant turn only (the last run of ones; earlier turns are context)."""
    out = np.zeros_like(mask)
    ones = np.flatnonzero(mask)
    if len(ones):
        end = int(ones[-1]) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start:end] = 1
    return out


def tokenize_response(tokenizer: Any, prompt: List[Dict[str, str]], response: str, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss mask uint8) of prompt + response; the mask covers the response turn only."""
    try:
        ids, mask = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": response}])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    mask = response_mask(mask)
    if not mask.any():
        raise ValueError(f"{where}: the chat template rendered no response tokens")
    return ids.astype(np.int32), mask.astype(np.uint8)


@dataclass
class _Tokenized:
    """What one line gives: pairs of (ids, mask) sequences, or why it gave none."""

    pairs: List[Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    skipped: Optional[str] = None
    capped: int = 0


def _line_parser(tokenizer: Any, pairs_from: str, length_ratio: float, max_pairs: int) -> Callable[[Any], _Tokenized]:
    def parse(obj: Any) -> _Tokenized:
        if pairs_from == "pairs":
            prompt, chosen, rejected = parse_pair(obj)
            return _Tokenized([(tokenize_response(tokenizer, prompt, chosen, "chosen"),
                                tokenize_response(tokenizer, prompt, rejected, "rejected"))])
        prompt, samples = parse_samples_record(obj)
        pos, negs, reason = long2short_pairs(samples, length_ratio)
        if reason is not None:
            return _Tokenized(skipped=reason)
        kept = negs[:max_pairs] if max_pairs > 0 else negs
        good = tokenize_response(tokenizer, prompt, samples[pos].response, f"samples[{pos}].response")
        return _Tokenized([(good, tokenize_response(tokenizer, prompt, samples[j].response, f"samples[{j}].response"))
                           for j in kept], capped=len(negs) - len(kept))
    return parse


# ---- the tokenized set ------------------------------------------------------------------------

class PairSet:
    """Tokenized pairs: sequence ``2k`` is pair k's chosen (prompt + response), ``2k + 1`` its rejected."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, lines: np.ndarray, source: str,
                 stats: Dict[str, Any], key: str = ""):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.lines = lines  # source line of each pair
        self.source, self.stats, self.key = source, stats, key

    def __len__(self) -> int:
        return len(self.lines)

    def sequence(self, j: int) -> Tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return self.ids[a:b], self.mask[a:b]

    @property
    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def pair_lengths(self) -> np.ndarray:
        s = self.seq_lengths
        return s[0::2] + s[1::2]

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, ids=self.ids, mask=self.mask, offsets=self.offsets, lines=self.lines,
                     meta=np.frombuffer(json.dumps({"source": self.source, "stats": self.stats,
                                                    "key": self.key}).encode(), dtype=np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PairSet":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            return cls(z["ids"], z["mask"], z["offsets"], z["lines"], meta["source"], meta["stats"], meta["key"])


def tokenize_pairs(path: str | Path, tokenizer: Any, pairs_from: str = "pairs", length_ratio: float = 1.5,
                   max_pairs: int = 0, on_error: str = "raise", key: str = "") -> PairSet:
    """Read and tokenize ``path`` (see the module docstring); ``ValueError("PATH:LINE: FIELD: ...")`` on a
    bad line (``on_error="raise"``), else it is counted in ``stats["bad_lines"]``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.pairs: {path} does not exist")
    bad = BadLines(str(path))
    ids: List[np.ndarray] = []
    masks: List[np.ndarray] = []
    lines: List[int] = []
    stats: Dict[str, Any] = {"pairs_from": pairs_from, "records": 0, "no_correct": 0, "no_negative": 0, "capped": 0}
    for lineno, rec in read_jsonl(path, _line_parser(tokenizer, pairs_from, length_ratio, max_pairs), on_error, bad):
        stats["records"] += 1
        if rec.skipped:
            stats[rec.skipped] += 1
        stats["capped"] += rec.capped
        for (c_ids, c_mask), (r_ids, r_mask) in rec.pairs:
            ids += [c_ids, r_ids]
            masks += [c_mask, r_mask]
            lines.append(lineno)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids]) if ids else []
    stats.update(pairs=len(lines), bad_lines=bad.count, bad_first=bad.lines[:1])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return PairSet(cat(ids, np.int32), cat(masks, np.uint8), offsets, np.asarray(lines, dtype=np.int64), str(path),
                   stats, key)


def cache_key(path: str | Path, tokenizer_dir: str | Path, pairs_from: str, length_ratio: float, max_pairs: int,
              on_error: str) -> str:
    from megatron_kimi.data.sft_cache import hash_file, tokenizer_fingerprint

    h = hashlib.sha256()
    settings = [CACHE_VERSION, tokenizer_fingerprint(tokenizer_dir), pairs_from, repr(float(length_ratio)),
                str(max_pairs), on_error]
    h.update("\0".join(settings).encode() + b"\0")
    hash_file(path, h)
    return h.hexdigest()


def build_or_load_pairs(cfg, cache_dir: Path) -> PairSet:
    """The tokenized pairs of a DPO config (``cfg``: a DPOConfig): from the cache, or tokenized and cached."""
    from megatron_kimi.data.sft_cache import resolve_tokenizer_dir
    from megatron_kimi.data.tokenizer import load_tokenizer

    d, a = cfg.data, cfg.dpo
    path = Path(d.pairs)
    if not path.is_file():
        raise ValueError(f"data.pairs: {path} does not exist")
    tok_dir = resolve_tokenizer_dir(d.tokenizer, cache_dir)
    key = cache_key(path, tok_dir, d.pairs_from, a.length_ratio, a.max_pairs_per_prompt, d.on_error)
    out = cache_dir / f"dpo_pairs_{key[:20]}.npz"
    if out.is_file():
        pairs = PairSet.load(out)
        if pairs.key == key:
            return pairs
    tokenizer = load_tokenizer(d.tokenizer, cache_dir)
    pairs = tokenize_pairs(path, tokenizer, d.pairs_from, a.length_ratio, a.max_pairs_per_prompt, d.on_error, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    pairs.save(out)
    return pairs


def describe(pairs: PairSet) -> str:
    s = pairs.stats
    text = f"{s['pairs']} pairs from {pairs.source}"
    if s["pairs_from"] == "samples":
        text += (f" ({s['records']} prompts by the long2short rule; no pair: {s['no_correct']} without a correct "
                 f"sample, {s['no_negative']} without a negative; {s['capped']} negatives over max_pairs_per_prompt)")
    if s["bad_lines"]:
        first = s["bad_first"][0] if s["bad_first"] else {}
        text += f"; {s['bad_lines']} bad line(s) skipped, first at line {first.get('line')}: {first.get('error')}"
    return text
