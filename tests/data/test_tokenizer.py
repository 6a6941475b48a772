"""Tests for megatron_kimi.data.tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_kimi.data.tokenizer import (
    CHAT_ROLE_TOKENS,
    DEFAULT_ALPHABET,
    build_char_tokenizer,
    load_tokenizer,
)

TRICKY = [
    "",
    " ",
    "   ",
    "a  b   c",
    " leading and trailing ",
    "line1\nline2\n\n",
    "\ttab\t\tsep\t",
    "12+34=46\n",
    "0123456789",
    "a , . ! ? ' \" ; :",
    "mixed \t\n \n\t end",
    "~`!@#$%^&*()_-+={}[]|\\<>/",
]


@pytest.fixture()
def char_tok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return load_tokenizer("builtin:char", tmp_path)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(char_tok, text: str) -> None:
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text


def test_round_trip_full_alphabet(char_tok) -> None:
    text = DEFAULT_ALPHABET * 2
    ids = char_tok.encode(text, add_special_tokens=False)
    assert char_tok.unk_token_id not in ids
    assert char_tok.decode(ids) == text


def test_special_token_ids(char_tok) -> None:
    assert char_tok.pad_token_id == 0
    assert char_tok.bos_token_id == 1
    assert char_tok.eos_token_id == 2
    assert char_tok.unk_token_id == 3
    assert char_tok.convert_tokens_to_ids(list(CHAT_ROLE_TOKENS)) == [4, 5, 6, 7]
    assert char_tok.convert_tokens_to_ids(DEFAULT_ALPHABET[0]) == 8
    assert len(char_tok) < 128
    assert len(char_tok) == 8 + len(DEFAULT_ALPHABET)


def test_chat_markers_are_single_tokens(char_tok) -> None:
    ids = char_tok.encode("<|user|>hi<|end|>", add_special_tokens=False)
    assert ids[0] == 5 and ids[-1] == 7 and len(ids) == 4


def test_unknown_char_maps_to_unk(char_tok) -> None:
    assert char_tok.encode("\u00e9", add_special_tokens=False) == [char_tok.unk_token_id]


def test_reload_gives_identical_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = load_tokenizer("builtin:char", tmp_path)
    out = tmp_path / "char_tokenizer"
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    second = load_tokenizer("builtin:char", tmp_path)
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    by_path = load_tokenizer(str(out), tmp_path)
    for text in TRICKY:
        a = first.encode(text, add_special_tokens=False)
        assert second.encode(text, add_special_tokens=False) == a
        assert by_path.encode(text, add_special_tokens=False) == a
    assert first.get_vocab() == second.get_vocab() == by_path.get_vocab()


def test_auto_tokenizer_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = build_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == 2
    assert tok.decode(tok.encode("  x\ny ", add_special_tokens=False)) == "  x\ny "


def test_custom_alphabet(tmp_path: Path) -> None:
    out = build_char_tokenizer(tmp_path / "tok", alphabet="ab ")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 11
    assert tok.encode("ab a", add_special_tokens=False) == [8, 9, 10, 8]


def test_missing_dir_raises(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ValueError, match="does_not_exist"):
        load_tokenizer(str(missing), tmp_path)


def test_pad_defaults_to_eos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = build_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.pad_token = None
    nopad = tmp_path / "nopad"
    tok.save_pretrained(str(nopad))
    loaded = load_tokenizer(str(nopad), tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == 2
