"""Scoring finished samples while generation goes on (rl/scoring.py, ``rl.async_scoring``): the same
rewards and counts as scoring after generation, in a pool that overlaps the caller; and a short RL run
whose records do not depend on it."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from megatron_kimi.rl import loop
from megatron_kimi.rl.rewards import RewardOutput, register_reward
from megatron_kimi.rl.scoring import AsyncScorer, score
from megatron_kimi.rl.types import Prompt, Sample
from tests.dist import run_distributed
from tests.rl import bodies

RELEASE = threading.Event()  # hung rewards wait on this; set at teardown so no thread outlives the module
LOG = []  # (event, response, time): what the recording rewards saw
BARRIER = threading.Barrier(4, timeout=10)


@pytest.fixture(autouse=True, scope="module")
def _release_hung_threads():
    yield
    RELEASE.set()


@register_reward("test-scoring-picky")
def _picky(samples):
    """Raises on a batch with 'boom'; 1 for '1', else 0."""
    if any(s.response == "boom" for s in samples):
        raise RuntimeError("cannot parse 'boom'")
    return [RewardOutput(float(s.response == "1"), s.response == "1") for s in samples]


@register_reward("test-scoring-hang")
def _hang(samples):
    RELEASE.wait(60)
    return [RewardOutput(1.0, True) for _ in samples]


@register_reward("test-scoring-slow")
def _slow(samples):
    LOG.append(("start", samples[0].response, time.monotonic()))
    time.sleep(0.2)
    LOG.append(("end", samples[0].response, time.monotonic()))
    return [RewardOutput(1.0, True) for _ in samples]


@register_reward("test-scoring-together")
def _together(samples):
    """Returns only once 4 calls are in flight at the same time (raises BrokenBarrierError otherwise)."""
    BARRIER.wait()
    return [RewardOutput(0.5, False) for _ in samples]


def _sample(response, kind="exact", answer="1"):
    return Sample(prompt_index=0, prompt=Prompt("q", answer=answer, kind=kind), prompt_ids=[1], response_ids=[2],
                  response=response, sampler_logprobs=[0.0], finish_reason="stop")


def _scored_one_by_one(samples, override=None, timeout_s=10.0, workers=4):
    scorer = AsyncScorer(override, timeout_s, workers)
    try:
        for s in samples:  # as the generator does: each sample as the engine finishes it
            scorer.submit([s])
        return scorer.wait()
    finally:
        scorer.close()


def test_loop_score_is_the_scoring_module_s():
    assert loop.score is score  # commands/difficulty.py and older callers import it from the loop


@pytest.mark.parametrize("override", [None, "test-scoring-picky"])
def test_async_scores_equal_scoring_after_generation(override):
    base = [_sample("1"), _sample("boom", "test-scoring-picky"), _sample("1", "test-scoring-picky"), _sample("2"),
            _sample("0", "test-scoring-picky"), _sample(" 1 ")]
    after, during = copy.deepcopy(base), copy.deepcopy(base)
    want = score(after, override, timeout_s=10)
    got = _scored_one_by_one(during, override)
    assert got == want
    assert want == {"reward_errors": 1, "reward_timeouts": 0}  # 'boom'
    assert [(s.correct, s.reward_parts) for s in during] == [(s.correct, s.reward_parts) for s in after]
    assert {s.reward_parts["task"] for s in during} == {0.0, 1.0}  # not all alike: the check has teeth


def test_a_hanging_reward_counts_the_same_timeouts_within_one_timeout_after_wait():
    """20 samples that each hang, one worker, 0.25 s per call: one by one that would be >= 5 s. Everything
    still queued when wait() is called must be done within one timeout from then."""
    n = 20
    after, during = [_sample(str(i), "test-scoring-hang") for i in range(n)], [_sample(str(i), "test-scoring-hang")
                                                                             for i in range(n)]
    want = score(after, None, timeout_s=0.25)
    t0 = time.monotonic()
    got = _scored_one_by_one(during, timeout_s=0.25, workers=1)
    assert time.monotonic() - t0 < 3.0  # not n x 0.25 s
    assert got == want == {"reward_errors": 0, "reward_timeouts": n}
    assert all(s.reward_parts == {"task": 0.0} and not s.correct for s in during)


def test_scoring_overlaps_the_generation_that_submits():
    """A fake generation submits a sample every 20 ms while slow rewards (0.2 s each) run in the pool:
    rewards start before generation is over, and several run at once."""
    LOG.clear()
    samples = [_sample(f"s{i}", "test-scoring-slow") for i in range(8)]
    scorer = AsyncScorer(None, 30.0, workers=4)
    try:
        for s in samples:
            scorer.submit([s])
            time.sleep(0.02)
        generation_end = time.monotonic()
        counts = scorer.wait()
    finally:
        scorer.close()
    assert counts == {"reward_errors": 0, "reward_timeouts": 0}
    starts = [t for ev, _, t in LOG if ev == "start"]
    assert len(starts) == 8 and min(starts) < generation_end  # scoring began while "generating"
    # some call started before another one ended: they ran concurrently (serial would never overlap)
    spans = {r: [t for ev, rr, t in LOG if rr == r] for _, r, _ in LOG}
    assert any(a[0] < b[0] < a[1] for a in spans.values() for b in spans.values() if a is not b)
    assert all(s.correct and s.reward_parts == {"task": 1.0} for s in samples)
    assert scorer.last_wait_s >= 0.0


def test_workers_run_rewards_at_the_same_time():
    # the reward returns only once 4 calls wait together: with fewer workers it times out (an error)
    samples = [_sample(str(i), "test-scoring-together") for i in range(4)]
    assert _scored_one_by_one(samples, workers=4) == {"reward_errors": 0, "reward_timeouts": 0}
    assert all(s.reward_parts == {"task": 0.5} for s in samples)


def test_an_unknown_reward_raises_at_submit():
    scorer = AsyncScorer(None, 1.0)
    try:
        with pytest.raises(ValueError, match="unknown reward"):
            scorer.submit([_sample("1", "no-such-reward")])
        assert scorer.wait() == {"reward_errors": 0, "reward_timeouts": 0}
    finally:
        scorer.close()


# ---- a short RL run: scored during generation vs after -------------------------------------------

# the non-digit half of the samples makes its reward raise: errors counted in both runs
RAISING = "data.reward=tests.rl.plugin_rewards:digit_else_raise"


def loop_counting_reward_batches(rank, world_size, run_dir, *overrides):
    """:func:`tests.rl.bodies.loop_with_fake_backend`, and the sizes of the reward's batches."""
    from tests.rl import plugin_rewards

    out = bodies.loop_with_fake_backend(rank, world_size, run_dir, *overrides)
    return dict(out, reward_batches=list(plugin_rewards.BATCHES))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("scoring")
    return {mode: run_distributed(loop_counting_reward_batches, 1, str(base / mode), RAISING,
                                  f"rl.async_scoring={str(mode == 'async').lower()}", timeout=240)[0]
            for mode in ("async", "after")}


def _untimed(history):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "rollout_tokens_per_s"}
            for r in history]


def test_an_rl_run_scored_during_generation_equals_one_scored_after(runs):
    during, after = runs["async"], runs["after"]
    assert _untimed(during["history"]) == _untimed(after["history"])  # rewards, accuracy, loss, counts, ...
    assert during["reports"] == after["reports"] and during["summary"] == after["summary"]
    for r in during["history"]:
        assert r["reward_errors"] == 4 and r["reward_timeouts"] == 0  # 4 prompts x k=2: the even samples
        assert 0.0 < r["reward"] < 1.0
        assert r["time_scoring_wait_s"] >= 0.0  # only when scored during generation
    assert not any("time_scoring_wait_s" in r for r in after["history"])
    # during: every sample alone, as it finished (nothing scored again after generation); after: one
    # call per iteration's batch (4 prompts x k=2), then each of its samples alone once it raised
    assert set(during["reward_batches"]) == {1}
    assert max(after["reward_batches"]) == 8


@pytest.mark.parametrize("layout", ["parallel.tensor=1", "parallel.tensor=2"], ids=["dp2", "tp2"])
def test_every_rank_gets_the_same_rewards_with_two_ranks(runs, tmp_path, layout):
    """Scored during generation on TP rank 0 of each data-parallel replica: the rewards and counts that
    rank 0 gathers and broadcasts are those of one rank scoring everything after generation."""
    ranks = run_distributed(loop_counting_reward_batches, 2, str(tmp_path / "run"), RAISING, layout,
                            timeout=300)
    keys = ("reward", "task_reward", "accuracy", "reward_errors", "reward_timeouts", "eval_accuracy")
    want = [{k: r.get(k) for k in keys} for r in runs["after"]["history"]]
    for out in ranks:
        assert [{k: r.get(k) for k in keys} for r in out["history"]] == want
        assert out["summary"] == runs["after"]["summary"]
    assert "time_scoring_wait_s" in ranks[0]["history"][0]
