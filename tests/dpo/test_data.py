"""DPO data: pairs from `sample`'s output by the 1.5x rule, tokenization (prompt masked), bad input named
file:line:field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.dist import run_cli

from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.dpo.data import SampleOut, long2short_pairs, tokenize_pairs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("builtin:char", tmp_path_factory.mktemp("tok"))


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# Hand-made: B (4 tokens) is the shortest correct sample; 1.5 x 4 = 6, so D (6, correct) is no negative
# and E (7, correct) is one; F ties with B but comes later; wrong samples are negatives whatever their length.
HAND = [("A", True, 10), ("B", True, 4), ("C", False, 3), ("D", True, 6), ("E", True, 7), ("F", True, 4), ("G", False, 20)]


def _samples(spec):
    return [SampleOut(f"resp {name}", ok, n) for name, ok, n in spec]


def test_long2short_rule_on_a_hand_made_prompt():
    s = _samples(HAND)
    assert long2short_pairs(s) == (1, [0, 2, 4, 6], None)
    assert long2short_pairs(s, max_pairs=2) == (1, [0, 2], None)
    assert long2short_pairs(s, length_ratio=2.0) == (1, [0, 2, 6], None)  # E (7 <= 8) is no longer a negative
    assert long2short_pairs(_samples([("A", False, 3), ("B", False, 9)])) == (None, [], "no_correct")
    assert long2short_pairs(_samples([("A", True, 4), ("B", True, 6), ("C", True, 5)])) == (None, [], "no_negative")
    assert long2short_pairs(_samples([("A", True, 5), ("B", True, 4), ("C", True, 7)])) == (1, [2], None)


def test_pairs_from_samples_file(tok, tmp_path):
    recs = [
        {"prompt": "2+2=", "answer": "4", "samples": [{"response": r, "correct": ok, "tokens": n} for r, ok, n in
                                                       [("x" * 10, True, 10), ("four", True, 4), ("5", False, 1),
                                                        ("sixsix", True, 6), ("sevenn7", True, 7)]]},
        {"prompt": "1+1=", "answer": "2", "samples": [{"response": "3", "correct": False, "tokens": 1}]},
        {"prompt": "1+2=", "answer": "3", "samples": [{"response": "3", "correct": True, "tokens": 1}] * 2},
    ]
    pairs = tokenize_pairs(_write(tmp_path / "s.jsonl", recs), tok, "samples", max_pairs=2)
    assert len(pairs) == 2 and list(pairs.lines) == [1, 1]
    s = pairs.stats
    assert (s["records"], s["no_correct"], s["no_negative"], s["capped"]) == (3, 1, 1, 1)

    def response(j):
        ids, mask = pairs.sequence(j)
        return tok.decode(ids[mask.astype(bool)], skip_special_tokens=False)

    assert [response(j) for j in range(4)] == ["four<|end|><eos>", "x" * 10 + "<|end|><eos>",
                                               "four<|end|><eos>", "5<|end|><eos>"]
    ids, mask = pairs.sequence(1)
    prompt = tok.decode(ids[~mask.astype(bool)], skip_special_tokens=False)
    assert prompt == "<bos><|user|>2+2=<|end|><|assistant|>"  # prompt and turn header: no loss


def test_pairs_file_plain_and_conversational_and_multi_turn(tok, tmp_path):
    recs = [
        {"prompt": "hi", "chosen": "yo", "rejected": "hello there"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "EARLIER"}, {"role": "user", "content": "b"}],
         "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "dd"}]},
    ]
    pairs = tokenize_pairs(_write(tmp_path / "p.jsonl", recs), tok, "pairs")
    assert len(pairs) == 2
    ids, mask = pairs.sequence(3)
    text = tok.decode(ids, skip_special_tokens=False)
    assert "EARLIER" in text  # the earlier assistant turn is context ...
    assert tok.decode(ids[mask.astype(bool)], skip_special_tokens=False) == "dd<|end|><eos>"  # ... not in the loss
    c_ids, _ = pairs.sequence(2)
    n_prompt = int(np.argmax(mask))  # chosen and rejected share the prompt tokens
    assert list(c_ids[:n_prompt]) == list(ids[:n_prompt])


BAD = [
    ("pairs", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a"}'],
     ":2: rejected: missing field"),
    ("pairs", ['{"prompt": "p", "chosen": 5, "rejected": "b"}'], ":1: chosen: expected a string"),
    ("pairs", ['{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
               '"chosen": "a", "rejected": "b"}'], ":1: prompt: the last message must be a user turn"),
    ("pairs", ['{"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}'], ":1: prompt[0]: "),
    ("pairs", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '', '{"prompt": "p", "chosen": "a", "rej'],
     ":3: malformed JSON"),
    ("samples", ['{"prompt": "p", "samples": [{"response": "a", "correct": true, "tokens": 1}, '
                 '{"response": "b", "correct": "yes", "tokens": 1}]}'], ":1: samples[1].correct: expected true/false"),
    ("samples", ['{"prompt": "p", "samples": [{"response": "a", "correct": true, "tokens": -1}]}'],
     ":1: samples[0].tokens: expected a non-negative integer"),
    ("samples", ['{"prompt": "p", "samples": [{"response": "a", "correct": true}]}'], ":1: samples[0].tokens: missing"),
    ("samples", ['{"prompt": "p", "answer": "1"}'], ":1: samples: missing field"),
]


@pytest.mark.parametrize("fmt,lines,msg", BAD, ids=[m.split(": ")[1] for _, _, m in BAD])
def test_bad_lines_name_file_line_and_field(tok, tmp_path, fmt, lines, msg):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as e:
        tokenize_pairs(path, tok, fmt)
    assert str(e.value).startswith(f"{path}{msg}"), str(e.value)


def test_skip_counts_bad_lines(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": 1}',
                                         '{"prompt": "q", "chosen": "c", "rejected": "d"}'])
    pairs = tokenize_pairs(path, tok, "pairs", on_error="skip")
    assert len(pairs) == 2 and list(pairs.lines) == [1, 3]
    assert pairs.stats["bad_lines"] == 1 and pairs.stats["bad_first"][0]["line"] == 2


def test_overlong_pair_dropped_and_counted_or_named(tok, tmp_path):
    from megatron_kimi.dpo.batching import fit_pairs

    path = _write(tmp_path / "p.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}',
                                         json.dumps({"prompt": "p", "chosen": "a", "rejected": "z" * 40})])
    pairs = tokenize_pairs(path, tok, "pairs")
    lens = pairs.pair_lengths
    view, dropped = fit_pairs(pairs, int(lens[0]), "drop")
    assert (len(view), dropped, list(view.source_lines)) == (1, 1, [1])
    with pytest.raises(ValueError, match=rf"^{path}:2: pair of {int(lens[1])} tokens .* does not fit training.seq_length"):
        fit_pairs(pairs, int(lens[0]), "error")


def test_cli_stops_on_a_bad_line_with_exit_2(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a"}'])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        env.pop(var, None)
    proc = run_cli(["dpo", "examples/long2short/dpo.yaml", f"run_dir={tmp_path / 'run'}", f"data.pairs={bad}",
                    "data.pairs_from=pairs"], cwd=str(REPO), env=env, timeout=150)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"megatron-kimi dpo: error: {bad}:2: rejected: missing field" in proc.stderr
    assert "Traceback" not in proc.stderr
