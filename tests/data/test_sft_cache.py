"""Tests for megatron_kimi.data.sft_cache (parallel tokenization into an on-disk cache)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_kimi.data import sft_cache
from megatron_kimi.data.chat import tokenize_conversation
from megatron_kimi.data.sft_cache import build_or_load_cache, cache_key
from megatron_kimi.data.tokenizer import build_char_tokenizer, load_tokenizer

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a, b = (int(x) for x in rng.integers(0, 1000, size=2))
        msgs = []
        if k % 3 == 0:
            msgs.append({"role": "system", "content": "You add numbers."})
        msgs += [
            {"role": "user", "content": f"{a}+{b}?"},
            {"role": "assistant", "content": f"{a + b}" + " ok" * int(rng.integers(0, 20))},
        ]
        if k % 4 == 0:
            msgs += [{"role": "user", "content": "double?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        rec: dict = {"messages": msgs}
        if k % 2 == 0:
            rec["source"] = "arith"
            rec["difficulty"] = int(rng.integers(1, 5))
        out.append(rec)
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


@pytest.fixture()
def tok_dir(tmp_path: Path) -> Path:
    return build_char_tokenizer(tmp_path / "tok")


def _cache_files(cache) -> dict[str, bytes]:
    return {name: (cache.path / name).read_bytes() for name in ("tokens.bin", "mask.bin", "index.npy", "meta.jsonl", "meta_offsets.npy")}


def test_build_contents_match_direct_tokenization(tmp_path: Path, tok_dir: Path) -> None:
    records = make_records(40)
    jsonl = write_records(tmp_path / "sft.jsonl", records)
    cache = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=2)
    tok = load_tokenizer(str(tok_dir), tok_dir)
    assert len(cache) == 40 and cache.built
    assert cache.path.parent == tmp_path / "cache" and cache.path.name == cache.key[:16]
    total = 0
    for i, rec in enumerate(records):
        ids, mask = tokenize_conversation(tok, rec["messages"])
        got_ids, got_mask = cache.sample(i)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mask, mask)
        assert got_ids.dtype == np.int32 and got_mask.dtype == np.uint8
        assert cache.lengths[i] == len(ids)
        total += len(ids)
    assert cache.stats["samples"] == 40 and cache.stats["tokens"] == total
    assert cache.stats["malformed_skipped"] == 0
    assert cache.lengths.dtype == np.int64
    np.testing.assert_array_equal(cache.sample(-1)[0], cache.sample(39)[0])
    with pytest.raises(IndexError):
        cache.sample(40)
    # no temporary build directories are left behind
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")] == []


def test_metadata_kept(tmp_path: Path, tok_dir: Path) -> None:
    records = make_records(12)
    records[3]["extra"] = {"nested": [1, "é"]}
    jsonl = write_records(tmp_path / "sft.jsonl", records)
    cache = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=2)
    for i, rec in enumerate(records):
        assert cache.meta(i) == {k: v for k, v in rec.items() if k != "messages"}
    assert cache.meta(1) == {}
    assert cache.meta(3)["extra"] == {"nested": [1, "é"]}


def test_reuse_does_not_retokenize(tmp_path: Path, tok_dir: Path) -> None:
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(20))
    first = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    mtime = (first.path / "tokens.bin").stat().st_mtime_ns
    second = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    assert first.built and not second.built
    assert second.path == first.path
    assert (second.path / "tokens.bin").stat().st_mtime_ns == mtime
    assert second.stats["build_seconds"] == first.stats["build_seconds"]


def test_rebuild_when_jsonl_changes(tmp_path: Path, tok_dir: Path) -> None:
    records = make_records(20)
    jsonl = write_records(tmp_path / "sft.jsonl", records)
    first = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    records[5]["messages"][-1]["content"] += "!"
    write_records(jsonl, records)
    second = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    assert second.built and second.path != first.path
    assert second.lengths[5] == first.lengths[5] + 1
    assert first.path.is_dir()  # old cache untouched


def test_rebuild_when_tokenizer_changes(tmp_path: Path, tok_dir: Path) -> None:
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(10))
    plain = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    # Same vocabulary plus a saved chat template: a different tokenizer.
    tok = load_tokenizer(str(tok_dir), tok_dir)
    tok.chat_template = CHATML_TEMPLATE
    templ_dir = tmp_path / "tok_chatml"
    tok.save_pretrained(str(templ_dir))
    templ = build_or_load_cache(jsonl, templ_dir, tmp_path / "cache", num_workers=2)
    assert templ.built and templ.key != plain.key
    ids, mask = templ.sample(0)
    text = "".join(tok.convert_ids_to_tokens(ids.tolist()))
    assert "<|im_start|>assistant\n" in text  # the workers used the saved template
    assert "".join(tok.convert_ids_to_tokens(ids[mask == 1].tolist())).endswith("<|im_end|>\n<eos>")
    # and a different alphabet also changes the key
    other = build_char_tokenizer(tmp_path / "tok_abc", alphabet="0123456789+? adoklusbeYNmr.!")
    assert cache_key(jsonl, other) not in (plain.key, templ.key)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_tokenizer_rewritten_in_place(tmp_path: Path, tok_dir: Path, num_workers: int) -> None:
    """Same directory, new files: a new key, and the new tokenizer is really used."""
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(10))
    plain = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=num_workers)
    tok = load_tokenizer(str(tok_dir), tok_dir)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(tok_dir))
    templ = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=num_workers)
    assert templ.built and templ.key != plain.key
    assert "<|im_start|>" in "".join(tok.convert_ids_to_tokens(templ.sample(0)[0].tolist()))


def test_builtin_spec(tmp_path: Path) -> None:
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(8))
    cache = build_or_load_cache(jsonl, "builtin:char", tmp_path / "cache", num_workers=2)
    assert (tmp_path / "cache" / "char_tokenizer" / "tokenizer.json").is_file()
    assert len(cache) == 8
    again = build_or_load_cache(jsonl, "builtin:char", tmp_path / "cache")
    assert not again.built and again.path == cache.path


def test_parallel_equals_serial(tmp_path: Path, tok_dir: Path) -> None:
    lines = [json.dumps(r) for r in make_records(300, seed=3)]
    lines.insert(17, "")
    lines.insert(150, "   ")
    lines.insert(200, "{broken")
    jsonl = write_lines(tmp_path / "sft.jsonl", lines)
    serial = build_or_load_cache(jsonl, tok_dir, tmp_path / "c1", num_workers=1, on_error="skip")
    parallel = build_or_load_cache(jsonl, tok_dir, tmp_path / "c2", num_workers=2, on_error="skip")
    assert serial.key == parallel.key
    assert _cache_files(serial) == _cache_files(parallel)
    for k in ("samples", "tokens", "loss_tokens", "lines", "blank_lines", "malformed_skipped", "malformed_lines"):
        assert serial.stats[k] == parallel.stats[k], k
    assert serial.stats["lines"] == 303 and serial.stats["blank_lines"] == 2
    assert serial.stats["malformed_lines"][0]["line"] == 201
    three = build_or_load_cache(jsonl, tok_dir, tmp_path / "c3", num_workers=3, on_error="skip")
    assert _cache_files(three) == _cache_files(serial)


@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("{not json", "malformed JSON"),
        ('{"text": "no messages"}', "missing field 'messages'"),
        ('{"messages": "hi"}', "must be a list"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant"),
        ('{"messages": [{"role": "assistant", "content": 7}]}', "must be a string"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, tok_dir: Path, bad: str, match: str, num_workers: int
) -> None:
    lines = [json.dumps(r) for r in make_records(120)]
    lines.insert(5, "")  # blank lines count as lines
    lines.insert(97, bad)  # -> line 98
    jsonl = write_lines(tmp_path / "sft.jsonl", lines)
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}:98: ") + ".*" + re.escape(match)):
        build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=num_workers)
    # nothing half-built remains
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != "char_tokenizer"] == []


def test_invalid_utf8_line(tmp_path: Path, tok_dir: Path) -> None:
    jsonl = tmp_path / "sft.jsonl"
    good = json.dumps(make_records(1)[0]).encode()
    jsonl.write_bytes(good + b"\n" + b'{"messages": "\xff"}\n' + good + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}:2: invalid UTF-8")):
        build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=1)


def test_skip_and_count(tmp_path: Path, tok_dir: Path) -> None:
    records = make_records(100)
    lines = [json.dumps(r) for r in records]
    bad_at = [3, 40, 77]  # 1-based final line numbers
    for ln in bad_at:
        lines.insert(ln - 1, '{"messages": []}')
    jsonl = write_lines(tmp_path / "sft.jsonl", lines)
    cache = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=2, on_error="skip")
    assert len(cache) == 100
    assert cache.stats["malformed_skipped"] == 3
    assert [e["line"] for e in cache.stats["malformed_lines"]] == bad_at
    assert all("empty" in e["error"] for e in cache.stats["malformed_lines"])
    for i, rec in enumerate(records):  # survivors keep their order and metadata
        assert cache.meta(i) == {k: v for k, v in rec.items() if k != "messages"}
    # The cache is reused, but on_error="raise" still reports the first bad line.
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}:3: ")):
        build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", on_error="ignore")


def test_skipped_list_is_capped(tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft_cache, "MAX_REPORTED_ERRORS", 3)
    lines = [json.dumps(r) for r in make_records(5)] + ["oops"] * 6
    jsonl = write_lines(tmp_path / "sft.jsonl", lines)
    cache = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache", num_workers=1, on_error="skip")
    assert cache.stats["malformed_skipped"] == 6
    assert [e["line"] for e in cache.stats["malformed_lines"]] == [6, 7, 8]


def test_damaged_cache_is_rebuilt(tmp_path: Path, tok_dir: Path) -> None:
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(10))
    first = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    expected = _cache_files(first)
    (first.path / "mask.bin").write_bytes(b"\0")
    again = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    assert again.built and again.path == first.path
    assert _cache_files(again) == expected


def test_empty_and_blank_only_files(tmp_path: Path, tok_dir: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cache = build_or_load_cache(empty, tok_dir, tmp_path / "cache", num_workers=2)
    assert len(cache) == 0 and cache.lengths.shape == (0,)
    blank = write_lines(tmp_path / "blank.jsonl", ["", " ", ""])
    cache = build_or_load_cache(blank, tok_dir, tmp_path / "cache", num_workers=2)
    assert len(cache) == 0 and cache.stats["blank_lines"] == 3
    assert not build_or_load_cache(blank, tok_dir, tmp_path / "cache").built


def test_last_line_without_newline_and_missing_inputs(tmp_path: Path, tok_dir: Path) -> None:
    records = make_records(3)
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert len(build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")) == 3
    with pytest.raises(ValueError, match="does not exist"):
        build_or_load_cache(tmp_path / "nope.jsonl", tok_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match="tokenizer directory does not exist"):
        build_or_load_cache(jsonl, tmp_path / "no_tok", tmp_path / "cache")


def test_cache_pickles(tmp_path: Path, tok_dir: Path) -> None:
    jsonl = write_records(tmp_path / "sft.jsonl", make_records(6))
    cache = build_or_load_cache(jsonl, tok_dir, tmp_path / "cache")
    cache.sample(0)  # opens the memmaps
    clone = pickle.loads(pickle.dumps(cache))
    for i in range(len(cache)):
        np.testing.assert_array_equal(clone.sample(i)[0], cache.sample(i)[0])
        np.testing.assert_array_equal(clone.sample(i)[1], cache.sample(i)[1])


def test_line_aligned_chunks_cover_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [f"line {i}" * (i % 7 + 1) for i in range(50)])
    data = path.read_bytes()
    for n in (1, 2, 3, 8, 200):
        ranges = sft_cache._line_aligned_chunks(path, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(s < e for s, e in ranges)
        assert all(data[s - 1 : s] == b"\n" for s, _ in ranges[1:])
        assert len(ranges) <= n
