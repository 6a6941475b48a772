"""Bad data input: every jsonl reader names PATH:LINE or skips and counts; empty and over-long data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_kimi.data.corpus import load_texts
from megatron_kimi.data.jsonl import BadLines, decode_line, read_jsonl
from megatron_kimi.data.packing import plan_epoch
from megatron_kimi.data.sft_cache import build_or_load_cache
from megatron_kimi.data.sft_source import PackedSFTSource

GOOD = b'{"text": "12+3=15"}\n'
# (line bytes, the reason the error must give); every one sits on line 3 of its file.
BAD_LINES = [
    (b'{"text": "ok"\n', "malformed JSON"),
    (b'{"text": "\xff\xfe"}\n', "invalid UTF-8"),
    (b'{"txt": "x"}\n', "missing field 'text'"),
    (b'{"text": 5}\n', "must be a string"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("bad, reason", BAD_LINES, ids=["json", "utf8", "field", "type"])
def test_corpus_bad_line_raises_with_file_and_line_or_is_skipped_and_counted(tmp_path, bad, reason):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(GOOD + b"\n" + bad + GOOD)  # line 2 blank, line 3 bad
    with pytest.raises(ValueError, match=re.escape(f"{p}:3: ") + ".*" + re.escape(reason)):
        load_texts(p)
    bad_lines = BadLines(str(p))
    assert load_texts(p, on_error="skip", bad=bad_lines) == ["12+3=15", "12+3=15"]
    assert bad_lines.count == 1 and bad_lines.lines[0]["line"] == 3
    assert reason in bad_lines.lines[0]["error"] and "skipped 1 bad line" in bad_lines.summary()


def test_truncated_last_line_is_named_as_such(tmp_path):
    p = tmp_path / "cut.jsonl"
    p.write_bytes(GOOD * 2 + b'{"text": "12+')  # a file cut off mid-write
    with pytest.raises(ValueError, match=re.escape(f"{p}:3: malformed JSON") + ".*truncated"):
        load_texts(p)
    bad = BadLines(str(p))
    assert len(load_texts(p, on_error="skip", bad=bad)) == 2 and bad.count == 1


def test_bad_lines_report_is_capped_but_counts_all(tmp_path, monkeypatch):
    from megatron_kimi.data import jsonl

    monkeypatch.setattr(jsonl, "MAX_REPORTED", 2)
    p = tmp_path / "many.jsonl"
    p.write_bytes(GOOD + b"oops\n" * 5)
    bad = BadLines(str(p))
    assert len(list(read_jsonl(p, lambda o: o, "skip", bad))) == 1
    assert bad.count == 5 and [e["line"] for e in bad.lines] == [2, 3]


def test_on_error_must_be_known_and_skip_needs_a_counter(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(GOOD)
    with pytest.raises(ValueError, match="on_error"):
        list(read_jsonl(p, lambda o: o, "ignore"))
    with pytest.raises(ValueError, match="BadLines"):
        list(read_jsonl(p, lambda o: o, "skip"))


def test_decode_line_reasons():
    assert decode_line(b'{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="truncated"):
        decode_line(b'{"a": ')
    with pytest.raises(ValueError, match=r"malformed JSON.*column") as ei:
        decode_line(b'{"a": }\n')
    assert "truncated" not in str(ei.value)


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"oops\n"], ids=["empty", "blank", "all-skipped"])
def test_empty_corpus_is_an_error_naming_the_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{p}: empty dataset")):
        load_texts(p, on_error="skip", bad=BadLines(str(p)))
    txt = tmp_path / "empty.txt"
    txt.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{txt}: empty dataset")):
        load_texts(txt)


def test_non_utf8_text_file_names_the_file(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{txt}: invalid UTF-8")):
        load_texts(txt)


# ------------------------------------------------------------------------------------------ SFT
def _chat(answer_len: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "1+1"},
                                    {"role": "assistant", "content": "2" * answer_len}]})


@pytest.fixture()
def overlong_cache(tmp_path):
    """Six conversations; lines 4 and 7 (after a blank line and a bad one, skipped) are over-long."""
    lines = [_chat(5), _chat(8), "", _chat(200), "not json", _chat(3), _chat(300), _chat(6)]
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("".join(line + "\n" for line in lines))
    cache = build_or_load_cache(jsonl, "builtin:char", tmp_path / "cache", num_workers=1, on_error="skip")
    assert len(cache) == 6 and cache.stats["malformed_skipped"] == 1
    assert cache.source_lines.tolist() == [1, 2, 4, 6, 7, 8]
    return jsonl, cache


def test_sft_cache_records_source_lines_with_parallel_workers(tmp_path):
    lines = [_chat(i % 7 + 1) if i % 5 else "" for i in range(1, 200)]
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("".join(line + "\n" for line in lines))
    serial = build_or_load_cache(jsonl, "builtin:char", tmp_path / "c1", num_workers=1)
    parallel = build_or_load_cache(jsonl, "builtin:char", tmp_path / "c2", num_workers=2, mp_context="fork")
    want = [i for i in range(1, 200) if i % 5]
    assert serial.source_lines.tolist() == want and parallel.source_lines.tolist() == want


@pytest.mark.parametrize("mode", ["truncate", "drop", "error"])
def test_overlong_samples_under_every_mode(overlong_cache, mode):
    jsonl, cache = overlong_cache
    seq = 64
    over = int((cache.lengths > seq).sum())
    assert over == 2
    if mode == "error":
        msg = re.escape(f"{jsonl}:4: sample of {int(cache.lengths[2])} tokens is longer than seq_length={seq}")
        with pytest.raises(ValueError, match=msg + r".*2 such sample"):
            PackedSFTSource(cache, seq, 1, 0, 1, seed=0, pad_id=0, overlong=mode)
        with pytest.raises(ValueError, match="sample 2 .*overlong='error'"):
            plan_epoch(cache.lengths, seq, seed=0, epoch=0, overlong=mode)
        return
    src = PackedSFTSource(cache, seq, 1, 0, 1, seed=0, pad_id=0, overlong=mode)
    plan = src.plan(0)
    assert plan.stats["overlong"] == over
    packed = sorted(i for b in plan.bins for i in b)
    if mode == "truncate":
        assert plan.stats["truncated"] == over and plan.stats["dropped"] == 0 and packed == list(range(6))
        mbs = [src.microbatches(k)[0] for k in range(src.steps_in_epoch(0))]
        assert all(mb["tokens"].shape == (1, seq) for mb in mbs)
    else:
        assert plan.stats["dropped"] == over and plan.stats["truncated"] == 0
        assert packed == [0, 1, 3, 5]
        assert plan.stats["dropped_tokens"] == int(cache.lengths[[2, 4]].sum())


def test_no_overlong_sample_passes_the_error_mode(overlong_cache):
    _, cache = overlong_cache
    seq = int(cache.lengths.max())
    src = PackedSFTSource(cache, seq, 1, 0, 1, seed=0, pad_id=0, overlong="error")
    assert sorted(i for b in src.plan(0).bins for i in b) == list(range(6))
    np.testing.assert_array_equal(src.plan(0).truncated, [])
