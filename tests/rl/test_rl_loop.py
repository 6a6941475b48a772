"""The RL loop (rl/loop.py) drives its rollout backend through the lifecycle of rollout/backend.py,
and reads the trainer's step reports by name."""

from __future__ import annotations

import math

import pytest

from tests.dist import run_distributed
from tests.rl import bodies

# Before the first iteration: wake the weights, take them, wake the KV cache, evaluate. Every
# iteration: generate, release for training, then the same wake-up with the new weights; a held-out
# evaluation after iterations 2 and 3 (the last). FakeBackend checks that the optimizer state is
# offloaded whenever it is awake.
WAKE = ["resume:weights", "update_weights", "resume:kv_cache"]
ITERATION = ["generate", "release"] + WAKE
EXPECTED = (WAKE + ["generate"] + ITERATION + ITERATION + ["generate"] + ITERATION + ["generate"] + ["close"])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return run_distributed(bodies.loop_with_fake_backend, 1, str(tmp_path_factory.mktemp("rl") / "run"),
                           timeout=240)[0]


def test_loop_calls_the_backend_lifecycle_in_order(fake_run):
    # FakeBackend itself asserted, at every call, no generate/update_weights while released and no
    # generate with weights older than the trainer's.
    assert fake_run["calls"] == EXPECTED
    assert fake_run["state"] == (3 * 2, 3)  # updates_per_iteration=2 optimizer steps per iteration
    assert [r["iteration"] for r in fake_run["history"]] == [1, 2, 3]
    assert ["eval_accuracy" in r for r in fake_run["history"]] == [False, True, True]
    assert set(fake_run["summary"]) == {"before", "after"}
    assert fake_run["summary"]["after"]["accuracy"] == fake_run["history"][-1]["eval_accuracy"]


def test_switches_are_timed_and_versioned(fake_run):
    history = fake_run["history"]
    assert [r["weight_version"] for r in history] == [2, 3, 4]  # one sync before the loop, one per iteration
    for r in history:
        for switch in ("release", "reload_optimizer", "offload_optimizer", "wake_weights", "sync_weights",
                       "wake_kv_cache"):
            assert r[f"time_switch_{switch}_s"] >= 0
        assert "sync_gbps" not in r  # the fake engine has no copy of the weights to move
    assert not fake_run["offloaded_at_end"]  # the trainer is left as it was found


def test_step_reports_are_named(fake_run):
    reports = fake_run["reports"]
    assert len(reports) == 6
    for loss, report in reports:
        assert set(report) == {"loss_sum", "loss_count", "log_ratio_sum"}
        assert report["loss_count"] == 4  # samples: 4 prompts x k=2, in 2 mini-batches
        assert loss == report["loss_sum"] / report["loss_count"] > 0  # the rewards differ: advantages ≠ 0
    # the first update of an iteration is at θ = θi (log-ratio 0), the second after one step
    assert [abs(r["log_ratio_sum"]) > 1e-6 for _, r in reports] == [False, True] * 3
    for i, rec in enumerate(fake_run["history"]):
        mine = reports[2 * i: 2 * i + 2]
        want = sum(r["log_ratio_sum"] / r["loss_count"] for _, r in mine) / 2
        assert math.isclose(rec["log_ratio"], want, rel_tol=1e-12, abs_tol=1e-15)
