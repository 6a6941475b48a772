"""Tests for megatron_kimi.data.corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_kimi.data.corpus import (
    SequenceSampler,
    TokenCorpus,
    generate_arithmetic_corpus,
    load_texts,
    make_batch,
)


def test_arithmetic_corpus_deterministic(tmp_path: Path) -> None:
    a = generate_arithmetic_corpus(tmp_path / "a.jsonl", 50, seed=3)
    b = generate_arithmetic_corpus(tmp_path / "b.jsonl", 50, seed=3)
    c = generate_arithmetic_corpus(tmp_path / "c.jsonl", 50, seed=4)
    assert a.read_text() == b.read_text() != c.read_text()
    texts = load_texts(a)
    assert len(texts) == 50
    for t in texts:
        assert t.endswith("\n")
        lhs, rhs = t.strip().split("=")
        x, y = (int(v) for v in lhs.split("+"))
        assert 0 <= x <= 99 and 0 <= y <= 99 and int(rhs) == x + y


def test_load_texts_jsonl_skips_blank(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n   \n{"text": "b", "x": 1}\n')
    assert load_texts(p) == ["a", "b"]
    p.write_text('{"body": "c"}\n')
    assert load_texts(p, text_key="body") == ["c"]


def test_load_texts_txt_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "doc.txt"
    p.write_text("line one\n\nline  two\n")
    assert load_texts(p) == ["line one\n\nline  two\n"]


@pytest.mark.parametrize(
    ("content", "bad_line", "problem"),
    [
        ('{"text": "ok"}\n\n{"text": oops}\n', 3, "malformed JSON"),
        ('{"text": "ok"}\n{"other": "x"}\n', 2, "missing field"),
        ('{"text": 5}\n', 1, "must be a string"),
        ('["text"]\n', 1, "JSON object"),
    ],
)
def test_load_texts_errors(tmp_path: Path, content: str, bad_line: int, problem: str) -> None:
    p = tmp_path / "bad_file.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError) as excinfo:
        load_texts(p)
    msg = str(excinfo.value)
    assert "bad_file.jsonl" in msg
    assert f":{bad_line}:" in msg
    assert problem in msg


def test_token_corpus_concat_and_shapes() -> None:
    docs = [[10, 11, 12], [20], [30, 31]]
    corpus = TokenCorpus(docs, eos_id=2, seq_length=3)
    expected_stream = [10, 11, 12, 2, 20, 2, 30, 31, 2]
    assert corpus.stream.tolist() == expected_stream
    assert corpus.stream.dtype in (np.int32, np.int64)
    assert len(corpus) == 2  # 9 // 4, remainder of 1 dropped
    assert corpus.sample(0).tolist() == [10, 11, 12, 2]
    assert corpus.sample(1).tolist() == [20, 2, 30, 31]
    assert all(corpus.sample(i).shape == (4,) for i in range(len(corpus)))
    with pytest.raises(IndexError):
        corpus.sample(2)


def test_token_corpus_too_short() -> None:
    assert len(TokenCorpus([[1, 2]], eos_id=2, seq_length=8)) == 0
    assert len(TokenCorpus([], eos_id=2, seq_length=8)) == 0


def test_sampler_deterministic_and_permutation() -> None:
    n = 17
    s1, s2 = SequenceSampler(n, seed=5), SequenceSampler(n, seed=5)
    assert s1.indices(0, 3 * n) == s2.indices(0, 3 * n)
    epochs = [s1.indices(e * n, n) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == np.random.default_rng(5).permutation(n).tolist()
    assert epochs[1] == np.random.default_rng(6).permutation(n).tolist()
    assert SequenceSampler(n, seed=6).indices(0, n) != epochs[0]


def test_sampler_resume_matches_long_order() -> None:
    n = 7
    sampler = SequenceSampler(n, seed=0)
    full = sampler.indices(0, 6 * n)
    for consumed in range(0, 4 * n):
        for count in (0, 1, 3, n, n + 2):
            assert sampler.indices(consumed, count) == full[consumed : consumed + count]
    # stepping in uneven batches reproduces the same stream
    pos, pieces = 0, []
    for count in (3, 5, 2, 9, 1, 6):
        pieces += sampler.indices(pos, count)
        pos += count
    assert pieces == full[:pos]


def test_make_batch() -> None:
    docs = [list(range(10, 20)), list(range(30, 45))]
    corpus = TokenCorpus(docs, eos_id=2, seq_length=5)
    batch = make_batch(corpus, [2, 0, 1])
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].shape == (3, 5)
        assert batch[key].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["loss_mask"], torch.ones(3, 5))
    assert torch.equal(batch["position_ids"], torch.arange(5).repeat(3, 1))
    for row, idx in enumerate([2, 0, 1]):
        sample = torch.from_numpy(corpus.sample(idx).astype(np.int64))
        assert torch.equal(batch["tokens"][row], sample[:-1])
        assert torch.equal(batch["labels"][row], sample[1:])
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_end_to_end_with_char_tokenizer(tmp_path: Path) -> None:
    from megatron_kimi.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:char", tmp_path)
    path = generate_arithmetic_corpus(tmp_path / "arith.jsonl", 40, seed=1)
    docs = [tok.encode(t, add_special_tokens=False) for t in load_texts(path)]
    corpus = TokenCorpus(docs, eos_id=tok.eos_token_id, seq_length=16)
    sampler = SequenceSampler(len(corpus), seed=0)
    batch = make_batch(corpus, sampler.indices(0, 4))
    assert batch["tokens"].shape == (4, 16)
    assert int(batch["tokens"].max()) < len(tok)
    text = tok.decode(corpus.stream.tolist(), skip_special_tokens=True)
    assert text == "".join(load_texts(path))
    assert json.loads(path.read_text().splitlines()[0])["text"].count("=") == 1
