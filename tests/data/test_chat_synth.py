"""The embedded demo data: the held-out split and the imperfect (carry-slipping) teacher."""

from __future__ import annotations

import json

import pytest

from megatron_kimi.data.chat_synth import generate_chat_arithmetic, is_heldout
from megatron_kimi.rl.data import arithmetic_prompts


def _pairs(path):
    for line in path.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        a, b = (int(x) for x in msgs[0]["content"].rstrip("=").split("+"))
        yield a, b, int(msgs[1]["content"])


def test_heldout_split_is_about_a_tenth_and_not_a_digit_rule():
    held = [(a, b) for a in range(100) for b in range(100) if is_heldout(a, b)]
    assert len(held) == 983
    # every last digit of each operand occurs in the split (the old rule kept only b % 10 == 7)
    assert {a % 10 for a, _ in held} == set(range(10)) == {b % 10 for _, b in held}
    prompts = arithmetic_prompts(300, seed=1, heldout=True)
    assert all(is_heldout(*map(int, p.prompt.rstrip("=").split("+"))) for p in prompts)


def test_carry_slip_drops_the_carry_at_the_given_rate_and_nothing_else(tmp_path):
    rows = list(_pairs(generate_chat_arithmetic(tmp_path / "d.jsonl", 6000, seed=3, operands=2, multi_turn=False,
                                                carry_slip=0.6)))
    assert not any(is_heldout(a, b) for a, b, _ in rows)
    carry = [(a, b, ans) for a, b, ans in rows if a % 10 + b % 10 >= 10]
    assert all(ans == a + b for a, b, ans in rows if a % 10 + b % 10 < 10)
    assert all(ans in (a + b, a + b - 10) for a, b, ans in carry)
    slipped = sum(ans == a + b - 10 for a, b, ans in carry) / len(carry)
    assert 0.55 < slipped < 0.65, slipped  # ~2700 carry rows: the std of the rate is ~0.01


def test_no_slip_is_a_correct_teacher_and_bad_rates_are_rejected(tmp_path):
    rows = list(_pairs(generate_chat_arithmetic(tmp_path / "d.jsonl", 2000, seed=3, operands=2, multi_turn=False)))
    assert all(ans == a + b for a, b, ans in rows)
    with pytest.raises(ValueError, match="carry_slip"):
        generate_chat_arithmetic(tmp_path / "e.jsonl", 10, seed=0, carry_slip=1.5)


def test_checks_add_only_length_and_leave_the_plain_data_unchanged(tmp_path):
    common = dict(seed=5, operands=2, multi_turn=False, carry_slip=0.6)
    plain = list(_pairs(generate_chat_arithmetic(tmp_path / "p.jsonl", 3000, **common)))
    assert plain == list(_pairs(generate_chat_arithmetic(tmp_path / "q.jsonl", 3000, checks=0, **common)))
    counts = [0, 0, 0]
    for line in generate_chat_arithmetic(tmp_path / "v.jsonl", 3000, checks=2, **common).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        q = msgs[0]["content"]
        a, b = q.rstrip("=").split("+")
        first, *checks, last = msgs[1]["content"].split("\n")
        s = first[len(q):]
        assert first.startswith(q) and last == f"answer: {s}"  # a slipped sum is slipped in every line
        assert checks == [f"check: {b}+{a}={s}"] * len(checks)
        assert int(s) in (int(a) + int(b), int(a) + int(b) - 10)
        counts[len(checks)] += 1
    assert all(800 < c < 1200 for c in counts), counts  # 0, 1, 2 checks uniformly
    with pytest.raises(ValueError, match="checks"):
        generate_chat_arithmetic(tmp_path / "e.jsonl", 10, seed=0, long_cot=True, checks=1)
