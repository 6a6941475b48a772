"""Causal-LM corpus: text loading, token stream packing, sampling and batching.

Documents are tokenized, joined into one stream with an eos token after each
document, and cut into non-overlapping samples of ``seq_length + 1`` tokens.
A :class:`SequenceSampler` gives a deterministic, per-epoch shuffled order
addressed by a global ``consumed`` counter so that resumed runs continue from
exactly the saved data position.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from megatron_kimi.data.jsonl import BadLines, read_jsonl

_MAX_OPERAND = 99


def _arithmetic_line(rng: np.random.Generator) -> str:
    """Return one ``"a+b=c\\n"`` line with a, b uniform in 0..99."""
    a, b = (int(x) for x in rng.integers(0, _MAX_OPERAND + 1, size=2))
    return f"{a}+{b}={a + b}\n"


def generate_arithmetic_corpus(path: str | Path, num_lines: int, seed: int) -> Path:
    """Write a jsonl file of ``{"text": "12+34=46\\n"}`` lines (deterministic in ``seed``)."""
    if num_lines < 0:
        raise ValueError(f"num_lines must be >= 0, got {num_lines}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(num_lines):
            f.write(json.dumps({"text": _arithmetic_line(rng)}) + "\n")
    return out


def _text_field(obj: object, text_key: str) -> str:
    """The ``text_key`` string field of one jsonl record (``ValueError`` naming the problem)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        raise ValueError(f"missing field {text_key!r}")
    value = obj[text_key]
    if not isinstance(value, str):
        raise ValueError(f"field {text_key!r} must be a string, got {type(value).__name__}")
    return value


def load_texts(path: str | Path, text_key: str = "text", on_error: str = "raise",
               bad: BadLines | None = None) -> list[str]:
    """Load documents from a ``.jsonl`` file (one object per line) or a plain text file.

    For jsonl, blank lines are skipped and every other line must be a JSON object with a string
    field ``text_key``; a bad line (also non-UTF-8 or truncated) raises ``ValueError("{path}:{lineno}:
    ...")``, or with ``on_error="skip"`` is left out and counted in ``bad``. Any other file is read
    whole as one document. A file without any text is a ``ValueError`` naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file does not exist")
    if p.suffix.lower() != ".jsonl":
        try:
            texts = [p.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: invalid UTF-8 ({e})") from None
    else:
        texts = [t for _, t in read_jsonl(p, lambda obj: _text_field(obj, text_key), on_error, bad)]
    if not any(texts):
        skipped = f", {bad.count} bad line(s) skipped" if bad is not None and bad.count else ""
        raise ValueError(f"{p}: empty dataset (no text{skipped})")
    return texts


class TokenCorpus:
    """Fixed-length causal-LM samples cut from a concatenated token stream.

    Each document is followed by ``eos_id``; the stream is split into
    non-overlapping samples of ``seq_length + 1`` tokens (remainder dropped).
    """

    def __init__(self, documents: Sequence[Sequence[int]], eos_id: int, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length = seq_length
        self.eos_id = eos_id
        self.stream = self._concatenate(documents, eos_id)
        self._sample_len = seq_length + 1
        self._num_samples = len(self.stream) // self._sample_len

    @staticmethod
    def _concatenate(documents: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
        """Join documents into one int64 stream with ``eos_id`` after each."""
        parts = [np.append(np.asarray(doc, dtype=np.int64), np.int64(eos_id)) for doc in documents]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._num_samples

    def sample(self, i: int) -> np.ndarray:
        """Return sample ``i``: ``seq_length + 1`` consecutive stream tokens."""
        if not 0 <= i < self._num_samples:
            raise IndexError(f"sample index {i} out of range [0, {self._num_samples})")
        start = i * self._sample_len
        return self.stream[start : start + self._sample_len]


class SequenceSampler:
    """Deterministic sample order, reshuffled every epoch, addressed by a global position.

    Epoch ``e`` is ``np.random.default_rng(seed + e).permutation(num_samples)``;
    global position ``p`` maps to epoch ``p // num_samples``, offset
    ``p % num_samples``.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Return the permutation of sample indices for ``epoch``."""
        return np.random.default_rng(self.seed + epoch).permutation(self.num_samples)

    def indices(self, consumed: int, count: int) -> list[int]:
        """Sample indices for global positions ``consumed .. consumed + count - 1``."""
        if consumed < 0 or count < 0:
            raise ValueError(f"consumed and count must be >= 0, got {consumed}, {count}")
        out: list[int] = []
        pos, end = consumed, consumed + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.num_samples - offset, end - pos)
            out.extend(int(x) for x in self.epoch_order(epoch)[offset : offset + take])
            pos += take
        return out


def make_batch(corpus: TokenCorpus, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: ``tokens``/``labels``/``position_ids`` int64, ``loss_mask`` float32."""
    if len(indices) == 0:
        raise ValueError("make_batch needs at least one index")
    samples = torch.from_numpy(np.stack([corpus.sample(i) for i in indices]).astype(np.int64))
    tokens = samples[:, :-1].contiguous()
    labels = samples[:, 1:].contiguous()
    batch_size, seq_len = tokens.shape
    position_ids = torch.arange(seq_len, dtype=torch.int64).unsqueeze(0).expand(batch_size, -1)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(batch_size, seq_len, dtype=torch.float32),
        "position_ids": position_ids.contiguous(),
    }
