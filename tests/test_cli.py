"""``python -m megatron_kimi``: an end-to-end tiny training run and the CLI's error reporting.

Every case runs in a process of its own (``tests.dist.run_cli``: forked from a forkserver that has
imported torch and megatron.core): Megatron keeps process-global state (parallel groups, RNG tracker).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.dist import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "train.yaml"

pytestmark = pytest.mark.timeout(180)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID",
                "SLURM_STEPID"):
        env.pop(var, None)  # a single process, whatever launched pytest
    return env


def _cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd=str(REPO), env=_env(), timeout=timeout)


def test_train_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("train", str(TINY), f"run_dir={run_dir}", "training.steps=12", "logging.progress_bar=false",
                "checkpoint.save_interval=6", "data.builtin_num_lines=2000")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"train: loss (\d+\.\d+) -> (\d+\.\d+) over steps 1\.\.12; run dir (.+)", last)
    assert m, last
    first_loss, last_loss = float(m.group(1)), float(m.group(2))
    assert last_loss < first_loss
    assert Path(m.group(3)) == run_dir

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert key in r, (key, r)
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert r["tokens"] == 16 * 64  # global batch x seq length
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    assert records[0]["loss"] == pytest.approx(first_loss, abs=1e-4)
    assert records[-1]["loss"] == pytest.approx(last_loss, abs=1e-4)

    tb = run_dir / "tensorboard"
    assert tb.is_dir() and any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000012"
    assert (ckpts / "iter_0000006").is_dir() and (ckpts / "iter_0000012").is_dir()
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000006", "iter_0000012"]  # no .tmp left


def test_bad_override_exits_2_without_traceback(tmp_path):
    proc = _cli("train", str(TINY), f"run_dir={tmp_path / 'run'}", "model.hiden_size=3", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "model.hiden_size" in proc.stderr and "model.hidden_size" in proc.stderr
    assert "config error" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_file_exits_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = _cli("train", str(missing), timeout=60)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_train():
    proc = _cli("--help", timeout=60)
    assert proc.returncode == 0
    assert "train" in proc.stdout


def test_no_command_is_a_usage_error():
    proc = _cli(timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr.lower()


def test_layout_clash_with_world_size_fails_fast(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("train", str(TINY), "parallel.tensor=2", f"run_dir={run_dir}", timeout=90)
    assert proc.returncode != 0
    assert proc.returncode == 2, proc.stderr
    assert "world size 1" in proc.stderr and "parallel.tensor=2" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()
