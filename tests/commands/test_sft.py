"""`megatron-kimi sft`: a short two-stage CPU run learns, resumes exactly, and TP2+SP matches TP1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_cli

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.builtin_num_samples=600", "logging.progress_bar=false", "checkpoint.save_interval=5",
          "logging.tensorboard=false"]


def _sft(run_dir, *overrides, nproc=1, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["sft", "examples/tiny/sft.yaml", f"run_dir={run_dir}", *COMMON, *overrides]
    out = run_cli(args, cwd=str(REPO), env=env, timeout=timeout, nproc=nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


def _metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "straight"
    stdout = _sft(run)
    return run, stdout


def test_two_stage_sft_learns_and_rewarms(straight):
    run, stdout = straight
    assert "sft stage 0 (short-context)" in stdout and "sft stage 1 (long-context)" in stdout
    assert "packing efficiency" in stdout
    recs = _metrics(run)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    stages = [r["stage"] for r in recs]
    assert stages == sorted(stages) and set(stages) == {0, 1}
    first1 = stages.index(1)
    assert recs[first1 - 1]["lr"] == pytest.approx(3e-4)  # stage 1 decayed to its floor ...
    assert max(r["lr"] for r in recs[first1:]) == pytest.approx(1.5e-3)  # ... stage 2 re-warmed to its peak
    assert recs[-1]["lr"] == pytest.approx(1.5e-4)
    early = sum(r["loss"] for r in recs[:3]) / 3
    late = sum(r["loss"] for r in recs[-3:]) / 3
    assert late < early - 1.0, (early, late)
    assert all(r["packing_efficiency"] > 0.9 for r in recs)
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{len(recs):07d}"


@pytest.mark.parametrize("stop_at", [7, None], ids=["mid-stage-1", "mid-stage-2"])
def test_resume_mid_stage_reproduces_the_same_batches(straight, tmp_path, stop_at):
    ref = _metrics(straight[0])
    stop = stop_at or next(r["step"] for r in ref if r["stage"] == 1) + 3
    run = tmp_path / "resumed"
    _sft(run, f"training.max_steps={stop}")
    assert len(_metrics(run)) == stop
    stdout = _sft(run)
    assert f"resumed from {run / 'checkpoints' / f'iter_{stop:07d}'} at step {stop}" in stdout
    got = _metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert (a["stage"], a["loss_tokens"]) == (b["stage"], b["loss_tokens"])  # same batches
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


def test_tp2_sequence_parallel_matches_single_process(straight, tmp_path):
    ref = _metrics(straight[0])
    run = tmp_path / "tp2sp"
    _sft(run, "parallel.tensor=2", "parallel.sequence_parallel=true", "training.max_steps=6", nproc=2)
    for a, b in zip(ref[:6], _metrics(run)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
