"""RL prompt files: a bad line names PATH:LINE or is skipped and counted; a prompt needs what its reward needs."""

from __future__ import annotations

import json
import re

import pytest

from megatron_kimi.data.jsonl import BadLines
from megatron_kimi.rl.data import load_prompts


def _write(tmp_path, lines, name="prompts.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return p


GOOD = json.dumps({"prompt": "1+1=", "answer": "2", "kind": "exact"})


@pytest.mark.parametrize(
    "bad, reason",
    [
        (json.dumps({"prompt": "2+2="}), "no 'answer' (the 'math' reward"),
        (json.dumps({"prompt": "2+2=", "answer": None, "kind": "exact"}), "no 'answer' (the 'exact' reward"),
        (json.dumps({"prompt": "2+2=", "answer": " "}), "'answer' must be a non-empty"),
        (json.dumps({"prompt": "print 1", "kind": "code"}), "no 'tests'"),
        (json.dumps({"prompt": "print 1", "kind": "code", "tests": "x"}), "'tests' must be a list"),
        (json.dumps({"question": "2+2="}), "string field 'prompt'"),
        ('{"prompt": "2+2=", "answer": ', "malformed JSON"),
        (b'{"prompt": "\xff", "answer": "1"}', "invalid UTF-8"),
    ],
    ids=["math-no-answer", "exact-null-answer", "blank-answer", "code-no-tests", "tests-type", "no-prompt",
         "json", "utf8"],
)
def test_bad_prompt_line_raises_with_file_and_line_or_is_counted(tmp_path, bad, reason):
    p = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{p}:3: ") + ".*" + re.escape(reason)):
        load_prompts(p)
    counter = BadLines(str(p))
    prompts = load_prompts(p, on_error="skip", bad=counter)
    assert [x.prompt for x in prompts] == ["1+1=", "1+1="]
    assert counter.count == 1 and counter.lines[0]["line"] == 3 and reason in counter.lines[0]["error"]


def test_answer_requirement_follows_the_reward_that_scores_the_prompt(tmp_path):
    no_answer = json.dumps({"prompt": "write a poem", "kind": "tests.rl.plugin_rewards:starts_with_digit"})
    p = _write(tmp_path, [no_answer])
    assert load_prompts(p)[0].answer is None  # a plugin may judge without a reference
    with pytest.raises(ValueError, match=re.escape(f"{p}:1: no 'answer' (the 'exact' reward")):
        load_prompts(p, reward="exact")  # data.reward overrides every prompt's kind
    plain = _write(tmp_path, [json.dumps({"prompt": "x"})], "plain.jsonl")
    assert load_prompts(plain, reward="tests.rl.plugin_rewards:starts_with_digit")[0].kind == "math"
    p2 = _write(tmp_path, [json.dumps({"prompt": "3+4=", "answer": 7})], "numeric.jsonl")
    assert load_prompts(p2)[0].answer == "7"


def test_empty_or_all_bad_prompt_file_is_an_error_naming_it(tmp_path):
    empty = _write(tmp_path, ["", "  "], "empty.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no prompts")):
        load_prompts(empty)
    all_bad = _write(tmp_path, [json.dumps({"prompt": "q"})] * 3, "bad.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{all_bad}: no prompts") + r".*3 bad line\(s\) skipped"):
        load_prompts(all_bad, on_error="skip", bad=BadLines(str(all_bad)))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
