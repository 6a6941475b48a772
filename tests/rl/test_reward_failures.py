"""A reward that raises, returns garbage or hangs scores 0 for its samples and is counted; the run goes on."""

from __future__ import annotations

import math
import threading
import time

import pytest

from megatron_kimi.rl.loop import score
from megatron_kimi.rl.rewards import RewardInput, RewardOutput, call_reward, register_reward
from megatron_kimi.rl.types import Prompt, Sample

RELEASE = threading.Event()  # hung rewards wait on this; set at teardown so no thread outlives the module


@pytest.fixture(autouse=True, scope="module")
def _release_hung_threads():
    yield
    RELEASE.set()


def _inputs(responses):
    return [RewardInput(prompt="q", response=r, answer="1") for r in responses]


def picky(samples):
    """Raises on a response 'boom' anywhere in the batch; 1 for '1', else 0."""
    if any(s.response == "boom" for s in samples):
        raise RuntimeError("cannot parse 'boom'")
    return [RewardOutput(float(s.response == "1"), s.response == "1") for s in samples]


def hangs_on(marker):
    def fn(samples):
        if any(s.response == marker for s in samples):
            RELEASE.wait(60)
        return [RewardOutput(float(s.response == "1"), s.response == "1") for s in samples]
    return fn


def test_a_raising_sample_costs_only_itself():
    outs, errors, timeouts = call_reward(picky, _inputs(["1", "boom", "0", "1"]), timeout_s=10)
    assert [o.score for o in outs] == [1.0, 0.0, 0.0, 1.0] and (errors, timeouts) == (1, 0)
    assert "RuntimeError: cannot parse 'boom'" in outs[1].info["error"]
    assert outs[1].info["batch_error"].startswith("RuntimeError")


def test_a_hanging_reward_times_out_with_zero_rewards():
    t0 = time.monotonic()
    outs, errors, timeouts = call_reward(hangs_on("1"), _inputs(["1", "0", "2"]), timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    assert [o.score for o in outs] == [0.0] * 3 and (errors, timeouts) == (0, 3)
    assert all(o.info["error"] == "timeout" for o in outs)


def test_per_sample_retries_share_one_deadline():
    def raise_then_hang(samples):
        if len(samples) > 1:
            raise ValueError("batch too big")
        return hangs_on("slow")(samples)

    t0 = time.monotonic()
    outs, errors, timeouts = call_reward(raise_then_hang, _inputs(["1", "slow", "1", "1"]), timeout_s=0.5)
    assert time.monotonic() - t0 < 5  # not one timeout per sample
    assert outs[0].score == 1.0 and outs[1].info["error"] == "timeout"
    assert errors == 0 and timeouts == 3  # the samples after the hung one are out of time too


@pytest.mark.parametrize(
    "result, expected_errors",
    [
        (lambda n: [RewardOutput(1.0, True)] * min(n, 2), 0),  # wrong length: scored one by one
        (lambda n: None, "all"),
        (lambda n: [RewardOutput(float("nan"), False)] * n, "all"),
        (lambda n: ["yes"] * n, "all"),
    ],
    ids=["short", "none", "nan", "not-an-output"],
)
def test_malformed_results_are_errors_or_rescored(result, expected_errors):
    def fn(samples):
        return result(len(samples))

    outs, errors, timeouts = call_reward(fn, _inputs(["1", "0", "1"]), timeout_s=5)
    assert len(outs) == 3 and timeouts == 0
    assert all(math.isfinite(o.score) for o in outs)
    assert errors == (3 if expected_errors == "all" else expected_errors)


def test_duck_typed_outputs_are_accepted():
    class Out:
        def __init__(self, score):
            self.score = score

    outs, errors, _ = call_reward(lambda ss: [Out(0.5) for _ in ss], _inputs(["1"]), timeout_s=5)
    assert errors == 0 and isinstance(outs[0], RewardOutput) and outs[0].score == 0.5 and outs[0].correct is False


@register_reward("test-picky")
def _registered_picky(samples):
    return picky(samples)


def _sample(response, kind):
    return Sample(prompt_index=0, prompt=Prompt("q", answer="1", kind=kind), prompt_ids=[1], response_ids=[2],
                  response=response, sampler_logprobs=[0.0], finish_reason="stop")


def test_the_rl_loop_scores_the_rest_and_counts_failures():
    samples = [_sample("1", "exact"), _sample("boom", "test-picky"), _sample("1", "test-picky"),
               _sample("2", "exact")]
    counts = score(samples, None, timeout_s=10)
    assert counts == {"reward_errors": 1, "reward_timeouts": 0}
    assert [s.reward_parts["task"] for s in samples] == [1.0, 0.0, 1.0, 0.0]
    assert [s.correct for s in samples] == [True, False, True, False]
    with pytest.raises(ValueError, match="unknown reward"):
        score([_sample("1", "no-such-reward")], None)
