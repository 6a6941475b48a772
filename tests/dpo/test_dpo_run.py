"""`megatron-kimi dpo` end to end on the tiny demo model (fp32, CPU/gloo): TP2, PP2 and DP2 train like one
process; a resumed run ends with the uninterrupted run's metrics and weights, bit for bit; the reference
log-probs are computed once (from checkpoint.load, not from whatever the weights are later), cached, read
back on resume, and recomputed identically when the cache is gone."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.dist import run_cli
import torch

from tests.checkpoints import global_tensors

REPO = Path(__file__).resolve().parents[2]
COMMON = ["logging.tensorboard=false", "logging.progress_bar=false", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4",
          "training.epochs=1", "checkpoint.keep_last=0"]
STEPS = 6
TIMING = ("tokens_per_s", "step_time_s", "peak_memory_mb")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _dpo(run_dir, *overrides, nproc=1, timeout=300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        env.pop(var, None)
    args = ["dpo", "examples/long2short/dpo.yaml", f"run_dir={run_dir}", *COMMON, *overrides]
    out = run_cli(args, cwd=str(REPO), env=env, timeout=timeout, nproc=nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


def _metrics(run_dir) -> list:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _reference(run_dir) -> torch.Tensor:
    (path,) = (Path(run_dir) / "cache").glob("dpo_reference_*.pt")
    return torch.load(path, weights_only=True)["values"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The model DPO starts from (and refers to): 2 DPO steps away from the seeded initialization."""
    run = tmp_path_factory.mktemp("dpo") / "base"
    _dpo(run, "training.max_steps=2")
    return run / "checkpoints"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base):
    run = tmp_path_factory.mktemp("dpo") / "straight"
    stdout = _dpo(run, f"checkpoint.load={base}", f"training.max_steps={STEPS}")
    return run, stdout


@pytest.fixture(scope="module")
def half(tmp_path_factory, base):
    run = tmp_path_factory.mktemp("dpo") / "half"
    _dpo(run, f"checkpoint.load={base}", f"training.max_steps={STEPS // 2}")
    return run


def test_straight_run_starts_at_its_reference_and_learns(straight, base):
    run, stdout = straight
    recs = _metrics(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    # step 1: the policy is checkpoint.load, the reference too (computed on the same packs): h = 0 exactly
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert (recs[0]["rewards/margins"], recs[0]["rewards/accuracies"]) == (0.0, 0.0)
    assert recs[-1]["rewards/margins"] > 0.1 and recs[-1]["rewards/accuracies"] > 0.5 and recs[-1]["loss"] < 0.65
    assert f"computed from {(base / 'iter_0000002').resolve()}" in stdout or f"computed from {base / 'iter_0000002'}" in stdout
    assert all(r["pairs"] >= 4 for r in recs)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_layout_matches_one_process(straight, base, tmp_path, layout):
    over = {"tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}[layout]
    steps = 4
    _dpo(tmp_path / layout, f"checkpoint.load={base}", f"training.max_steps={steps}", *over, nproc=2)
    ref, got = _metrics(straight[0])[:steps], _metrics(tmp_path / layout)
    assert len(got) == steps
    for a, b in zip(ref, got):
        assert b["pairs"] == a["pairs"] and b["consumed_samples"] == a["consumed_samples"]
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (layout, a["step"], k)
        assert b["rewards/accuracies"] == a["rewards/accuracies"], (layout, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (layout, a["step"])
    assert torch.allclose(_reference(tmp_path / layout), _reference(straight[0]), rtol=1e-6, atol=1e-5)


def _assert_same_run(run, straight_run):
    assert _metrics(run) == _metrics(straight_run)  # every metric of every step, bit for bit
    name = f"iter_{STEPS:07d}"
    a, b = global_tensors(run / "checkpoints" / name), global_tensors(straight_run / "checkpoints" / name)
    assert a.keys() == b.keys() and any("optimizer" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact_and_reads_the_cached_reference(straight, half, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half, run)
    (cached,) = (run / "cache").glob("dpo_reference_*.pt")
    stamp = cached.stat().st_mtime_ns
    stdout = _dpo(run, f"checkpoint.load={straight[0]}/../base/checkpoints", f"training.max_steps={STEPS}")
    assert f"resumed from {run / 'checkpoints' / f'iter_{STEPS // 2:07d}'} at step {STEPS // 2}" in stdout
    assert f"reference log-probs of 128 pairs loaded from {cached}" in stdout and "computed" not in stdout
    assert cached.stat().st_mtime_ns == stamp
    assert torch.equal(_reference(run), _reference(straight[0]))  # = a fresh computation, in another run dir
    _assert_same_run(run, straight[0])


def test_resume_without_the_cache_recomputes_it_from_the_reference_checkpoint(straight, half, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(half, run)
    for f in (run / "cache").glob("dpo_reference_*.pt"):
        f.unlink()
    stdout = _dpo(run, f"checkpoint.load={base}", f"training.max_steps={STEPS}")
    assert "(not in the cache)" in stdout and "iter_0000002" in stdout.split("(not in the cache)")[0].splitlines()[-1]
    assert torch.equal(_reference(run), _reference(straight[0]))  # from the reference, not the resumed weights
    _assert_same_run(run, straight[0])
