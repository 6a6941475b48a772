"""Partial rollouts through the RL loop: stitched segments equal one-go generation, and a run stopped
and resumed mid-way (replay buffer and prompt-sampler state in the checkpoint) equals a straight run."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed
from tests.rl import bodies

KEYS = ("iteration", "reward", "accuracy", "loss", "response_length_mean", "log_ratio", "replay_groups",
        "replay_trajectories", "completed_groups", "stale_token_fraction")


def test_greedy_segments_stitched_over_iterations_equal_the_unbudgeted_run(tmp_path):
    out = run_distributed(bodies.partial_greedy_stitched, 1, str(tmp_path / "run"), timeout=240)[0]
    assert out["iterations"] >= 3  # 9 tokens at 3 per iteration: segments really were stitched
    whole, stitched = out["whole"], out["stitched"]
    assert len(whole) == len(stitched) == 6
    assert any(len(set(v)) > 1 for *_, v in stitched)  # some responses span several weight versions
    for (k1, ids1, lp1, fin1, _, _), (k2, ids2, lp2, fin2, start, versions) in zip(whole, stitched):
        assert (k1, ids1, fin1) == (k2, ids2, fin2)  # token ids and why each stopped
        assert lp2 == pytest.approx(lp1, abs=1e-5)  # the sampler's log-probs: prefill of prompt+partial vs decode
        assert start == (max(i for i, v in enumerate(versions) if v != versions[-1]) + 1 if len(set(versions)) > 1
                         else 0)  # the loss covers the last segment


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_the_straight_run(tmp_path):
    straight = run_distributed(bodies.partial_loop, 1, str(tmp_path / "straight"), 4, 99, timeout=300)[0]
    first = run_distributed(bodies.partial_loop, 1, str(tmp_path / "run"), 4, 2, timeout=300)[0]
    assert all(r["completed_groups"] >= 1 for r in straight["history"])  # every iteration trains
    assert first["stopped"] and first["iteration"] == 2
    assert first["state"]["buffer"]["groups"]  # trajectories were in flight at the stop
    second = run_distributed(bodies.partial_loop, 1, str(tmp_path / "run"), 4, 99, timeout=300)[0]
    assert second["iteration"] == 4 and not second["stopped"]
    want = [{k: r.get(k) for k in KEYS} for r in straight["history"]]
    got = [{k: r.get(k) for k in KEYS} for r in first["history"] + second["history"]]
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    assert got == want
    assert second["state"] == straight["state"]  # the same buffer (no trajectory lost or repeated) and stats
    assert sum(straight["state"]["sampler"]["attempts"]) == sum(r.get("completed_groups", 0)
                                                                for r in straight["history"]) * 2
