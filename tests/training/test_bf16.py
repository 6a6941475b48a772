"""bf16 on CPU: Float16Module + fp32 main params (plain and distributed optimizer)."""

from __future__ import annotations

import math

from tests.dist import run_distributed
from tests.parallel.harness import train_layout


def test_bf16_trains_and_tp2_distopt_tracks_tp1(tmp_path):
    bf16 = ["precision.dtype=bf16"]
    one = run_distributed(train_layout, 1, bf16, 4, str(tmp_path / "a"), False, timeout=240)[0]["records"]
    two = run_distributed(train_layout, 2, bf16 + ["parallel.tensor=2", "parallel.distributed_optimizer=true"], 4,
                          str(tmp_path / "b"), False, timeout=240)[0]["records"]
    losses = [r["loss"] for r in one]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses
    for a, b in zip(one, two):  # bf16 activations: equal up to bf16 rounding, not bit-exact
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-2), (a["loss"], b["loss"])
