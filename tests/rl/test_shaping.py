"""Length penalty (Kimi k1.5 §2.3.3) and repeat detection."""

from __future__ import annotations

import random

import pytest

from megatron_kimi.rl.shaping import (
    RepeatDetector,
    detect_repeat,
    first_repeat_index,
    length_penalty,
    length_penalty_active,
)


# ---------------------------------------------------------------------------------- length
def test_all_equal_lengths_add_nothing():
    assert length_penalty([7, 7, 7], [True, False, True], 0.5) == [0.0, 0.0, 0.0]
    assert length_penalty([3], [True], 1.0) == [0.0]
    assert length_penalty([], [], 1.0) == []


def test_mixed_exact_numbers():
    # min 10, max 30: λ = 0.5 - (len-10)/20 → 10: 0.5, 15: 0.25, 20: 0, 25: -0.25, 30: -0.5
    lengths = [10, 15, 20, 25, 30, 10, 30]
    correct = [True, True, True, True, True, False, False]
    got = length_penalty(lengths, correct, 0.2)
    want = [0.2 * 0.5, 0.2 * 0.25, 0.0, 0.2 * -0.25, 0.2 * -0.5,  # correct: w·λ
            0.0,  # wrong and short: w·min(0, 0.5) = 0
            0.2 * -0.5]  # wrong and long: w·min(0, -0.5)
    assert got == pytest.approx(want, abs=1e-12)


def test_wrong_short_never_rewarded():
    got = length_penalty([1, 2, 100], [False, False, False], 1.0)
    assert all(g <= 0 for g in got) and got[0] == 0.0 and got[2] == pytest.approx(-0.5)


def test_length_penalty_size_mismatch():
    with pytest.raises(ValueError):
        length_penalty([1, 2], [True], 1.0)


def test_warmup_boundary():
    assert not length_penalty_active(0, 3)
    assert not length_penalty_active(2, 3)
    assert length_penalty_active(3, 3)
    assert length_penalty_active(10, 3)
    assert length_penalty_active(0, 0)


# ---------------------------------------------------------------------------------- repeats
def _tail_is_loop_bruteforce(seq, max_period, min_repeats, min_tokens) -> bool:
    n = len(seq)
    for p in range(1, max_period + 1):
        # longest p-periodic suffix
        L = min(p, n)
        while L < n and seq[n - 1 - L] == seq[n - 1 - L + p]:
            L += 1
        if L >= p and L >= min_repeats * p and L >= min_tokens:
            return True
    return False


def _chars(s: str):
    return [ord(c) for c in s]


def test_single_token_loop():
    seq = _chars("The answer is ") + [7] * 40
    idx = first_repeat_index(seq)
    assert idx == len(_chars("The answer is ")) + 32 - 1  # fires once 32 identical tokens are seen
    assert detect_repeat(seq)


@pytest.mark.parametrize("period", [2, 5, 13, 40, 64])
def test_ngram_loops_detected(period):
    rng = random.Random(period)
    block = [rng.randrange(1000) for _ in range(period)]
    prefix = [rng.randrange(1000) for _ in range(50)]
    seq = prefix + block * max(6, 40 // period + 1)  # ≥ 4 copies and ≥ 32 tokens
    assert detect_repeat(seq)
    assert not detect_repeat(prefix + block * 3)  # 3 copies are not a loop yet
    idx = first_repeat_index(seq)
    need = max(4 * period, 32)
    assert idx is not None and idx - len(prefix) + 1 <= need + period  # fires within ~one period of the threshold


def test_text_phrase_loop_detected_and_stops_early():
    text = "Let me reconsider. " * 8
    d = RepeatDetector()
    stop = next(i for i, t in enumerate(_chars(text)) if d.update(t))
    assert stop < 4 * len("Let me reconsider. ") + 5
    assert d.triggered and d.first_index == stop


def test_no_false_positive_on_arithmetic_and_prose():
    arithmetic = "".join(f"{a}+{a}={2 * a}\n" for a in range(1, 60))
    prose = ("We are asked to find the sum of two numbers. First, note that the tens digits add up, "
             "then the units. Carry the one if needed; the result follows. ") * 1
    table = "".join(f"{i} {i * i} {i ** 3}\n" for i in range(40))
    for text in (arithmetic, prose, table, "1 1 1 2 3 5 8 13 21", "=" * 20 + " done",
                 "0.000000001", "abababab"):
        assert not detect_repeat(_chars(text)), text[:40]


def test_min_repeats_and_max_period_respected():
    block = list(range(10))
    assert not detect_repeat(block * 3, min_repeats=4, min_tokens=10)  # only 3 copies
    assert detect_repeat(block * 4, min_repeats=4, min_tokens=10)
    long_block = list(range(100))
    assert not detect_repeat(long_block * 5, max_period=64)  # period beyond max_period
    assert detect_repeat(long_block * 5, max_period=128)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_bruteforce_on_every_prefix(seed):
    rng = random.Random(seed)
    P, R, M = 12, 3, 10
    seq = []
    while len(seq) < 400:  # random text with occasional loops of random periods
        if rng.random() < 0.3:
            blk = [rng.randrange(6) for _ in range(rng.randint(1, 14))]
            seq += blk * rng.randint(1, 5)
        else:
            seq += [rng.randrange(6) for _ in range(rng.randint(1, 20))]
    d = RepeatDetector(P, R, M)
    inc = [d.update(t) for t in seq]
    brute = [_tail_is_loop_bruteforce(seq[: i + 1], P, R, M) for i in range(len(seq))]
    assert inc == brute
    assert any(inc) and not all(inc)
    assert detect_repeat(seq, P, R, M) == any(inc)
    assert detect_repeat(seq, P, R, M, tail_only=True) == inc[-1]
    assert first_repeat_index(seq, P, R, M) == (inc.index(True) if any(inc) else None)


def test_reset_and_factory_default_constructor():
    d = RepeatDetector()  # the rollout engine calls the class with no arguments
    assert d.extend([1] * 40)
    d.reset()
    assert len(d) == 0 and not d.triggered and not d.update(1)
