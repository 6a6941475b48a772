"""rl/prompt_sampler.py: uniform (the demo's old stream), curriculum and prioritized prompt sampling."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_kimi.rl.prompt_sampler import PromptSampler, difficulty_value
from megatron_kimi.rl.types import Prompt


def _prompts(n, difficulty=None):
    return [Prompt(prompt=f"q{i}", answer=str(i), kind="exact",
                   difficulty=None if difficulty is None else difficulty(i)) for i in range(n)]


def test_uniform_draws_the_demo_stream():
    """The default keeps exactly the draws the demo's numbers were measured with."""
    sampler = PromptSampler(_prompts(4000), "uniform", seed=3)
    for it in (0, 1, 17):
        want = np.random.default_rng(3 * 7919 + it).choice(4000, size=64, replace=False)
        assert sampler.sample(64, it) == [int(i) for i in want]
    assert sorted(PromptSampler(_prompts(5), seed=0).sample(64, 0)) == [0, 1, 2, 3, 4]  # fewer than asked


def test_curriculum_draws_the_easy_part_until_the_switch():
    prompts = _prompts(10, difficulty=lambda i: ["hard", "easy", 0.3, "0.9", "medium", 0.1, 1, 0.2, 0.8, 0.0][i])
    sampler = PromptSampler(prompts, "curriculum", seed=0, curriculum_switch_iteration=5, curriculum_easy_fraction=0.4)
    easy = {1, 9, 5, 7}  # difficulties 0, 0, 0.1, 0.2 (ties in file order)
    for it in range(5):
        assert set(sampler.sample(3, it)) <= easy
    assert len(sampler.sample(10, 4)) == 4  # only the eligible ones
    seen = set()
    for it in range(5, 40):
        seen |= set(sampler.sample(3, it))
    assert seen == set(range(10))
    assert difficulty_value("Hard") == 1.0 and difficulty_value(" 0.25") == 0.25
    with pytest.raises(ValueError, match="difficulty"):
        difficulty_value("impossible")
    with pytest.raises(ValueError, match="prompt 2 .*no 'difficulty'"):
        PromptSampler(_prompts(3, difficulty=lambda i: None if i == 2 else 0.5), "curriculum")


def test_prioritized_frequencies_match_one_minus_success_plus_floor():
    """Chi-square goodness of fit of 20k single draws against P(i) ∝ (1 - s_i) + floor."""
    n, floor = 6, 0.05
    sampler = PromptSampler(_prompts(n), "prioritized", seed=11, priority_floor=floor)
    rates = [0.0, 0.25, 0.5, 0.75, 1.0, 0.9]
    for i, r in enumerate(rates):  # 20 samples each, round(20 r) of them right
        k = int(round(20 * r))
        sampler.update([i] * 20, [1.0] * k + [0.0] * (20 - k))
    np.testing.assert_allclose(sampler.success_rate(), rates)
    expected_p = (1 - np.asarray(rates)) + floor
    expected_p /= expected_p.sum()
    np.testing.assert_allclose(sampler.weights(0), expected_p)
    draws = 20000
    counts = np.bincount([sampler.sample(1, it)[0] for it in range(draws)], minlength=n)
    expected = expected_p * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (chi2, counts, expected)  # df 5: P(chi2 > 20.5) = 0.001
    # a biased sampler (uniform here) is rejected by the same test
    uniform = np.full(n, draws / n)
    assert float(((uniform - expected) ** 2 / expected).sum()) > 20.5


def test_prioritized_prefers_unsolved_and_state_round_trips():
    sampler = PromptSampler(_prompts(4), "prioritized", seed=0)
    assert np.allclose(sampler.weights(0), 0.25)  # never tried: all at the top priority
    sampler.update([0, 0, 1], [1.0, 1.0, 0.0])
    w = sampler.weights(0)
    assert w[0] < w[1] == w[2] == w[3]
    again = PromptSampler(_prompts(4), "prioritized", seed=0)
    again.load_state_dict(sampler.state_dict())
    assert again.sample(3, 7) == sampler.sample(3, 7)
    with pytest.raises(ValueError, match="same data.prompts"):
        PromptSampler(_prompts(5), "prioritized").load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="priority_floor"):
        PromptSampler(_prompts(2), "prioritized", priority_floor=0.0)
    with pytest.raises(ValueError, match="data.sampling"):
        PromptSampler(_prompts(2), "greedy")
