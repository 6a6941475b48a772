"""`bash slurm/*.sh` without Slurm: local torchrun / single process, SIGUSR1 -> checkpoint -> resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SFT = ["examples/tiny/sft.yaml", "training.max_steps=16", "checkpoint.save_interval=0", "logging.tensorboard=false"]
RL = ["examples/demo/rl.yaml", "data.reward=tests.rl.plugin_rewards:starts_with_digit", "rl.iterations=5",
      "rl.eval_interval=0", "data.eval_size=16", "rl.prompts_per_iteration=8", "rl.k=4", "rollout.max_new_tokens=3",
      "checkpoint.save_interval=0", "logging.tensorboard=false", "optimizer.lr=3e-3", "optimizer.min_lr=3e-3"]


def _env(nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(env, NPROC=str(nproc), OMP_NUM_THREADS="1", PY=os.environ.get("PY", _python()))


def _python() -> str:
    import sys

    return sys.executable


def _metrics(run: Path) -> list:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _run(script, args, nproc, timeout=600):
    return subprocess.run(["bash", script, *args], cwd=REPO, env=_env(nproc), capture_output=True, text=True,
                          timeout=timeout)


def _run_and_signal(script, args, nproc, run: Path, after: int, timeout=600):
    """Start the script, SIGUSR1 its shell once `after` records exist, return (rc, output)."""
    proc = subprocess.Popen(["bash", script, *args], cwd=REPO, env=_env(nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + timeout
        while len(_metrics(run)) < after:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < end, "no progress"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, nproc, key, after",
    [("slurm/sft.sh", SFT, 2, "loss", 4), ("slurm/rl.sh", RL, 1, "reward", 2)],
    ids=["sft-torchrun-2", "rl-single"],
)
def test_sigusr1_checkpoints_and_a_rerun_resumes_exactly(tmp_path, script, args, nproc, key, after):
    straight = tmp_path / "straight"
    ref = _run(script, [*args, f"run_dir={straight}"], nproc)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]

    run = tmp_path / "preempted"
    rc, out = _run_and_signal(script, [*args, f"run_dir={run}"], nproc, run, after)
    assert rc == 75, out[-3000:]
    assert "run the same command again to resume" in out
    first = _metrics(run)
    total = len(_metrics(straight))
    assert after <= len(first) < total, out[-2000:]
    assert (run / "checkpoints" / "latest").is_file()

    again = _run(script, [*args, f"run_dir={run}"], nproc)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    got, want = _metrics(run), _metrics(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # nothing lost or repeated
    assert [r[key] for r in got] == [r[key] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert (run / "logs" / f"{Path(script).stem}-local.log").is_file()


@pytest.mark.slow
def test_sigusr1_with_a_failed_save_is_reported_not_claimed(tmp_path):
    """The stop checkpoint cannot be written (a file where checkpoints/ belongs): the script must not
    say it saved, must not exit with the "requeue me" code, and must say what happened."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("in the way\n")
    rc, out = _run_and_signal("slurm/sft.sh", [*SFT, f"run_dir={run}"], 1, run, 2)
    assert rc not in (0, 75), out[-3000:]
    assert "the stop checkpoint was NOT confirmed" in out and "not requeueing" in out, out[-3000:]
    assert "checkpoint saved" not in out and "run the same command again to resume" not in out
