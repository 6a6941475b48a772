"""Helpers for kill-and-resume tests: launch a command in its own session, kill its whole process
tree (as Slurm would) when a condition on its progress holds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(args, log) -> subprocess.Popen:
    """``python -m megatron_kimi ARGS`` as one process (no launcher), output to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_kimi", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def logged_step(log_path: Path) -> int:
    """The last ``step N/`` progress line of this launch's own log (the metrics file still holds the
    killed run's records until the resumed run truncates it)."""
    steps = re.findall(r"^step (\d+)/", log_path.read_text(), flags=re.M)
    return int(steps[-1]) if steps else 0


def saving(run: Path, since_ns: int) -> bool:
    """A save is under way: a ``.tmp`` checkpoint directory made after ``since_ns`` (older ones are
    left by earlier kills)."""
    d = run / "checkpoints"
    if not d.is_dir():
        return False
    for t in d.glob("*.tmp"):
        try:
            if t.stat().st_mtime_ns >= since_ns:
                return True
        except FileNotFoundError:
            pass
    return False


def after(cond, delay: float):
    """A condition that holds ``delay`` seconds after ``cond`` first held."""
    since: list = []

    def check() -> bool:
        if not since and cond():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= delay

    return check


def signal_when(proc: subprocess.Popen, cond, log_path: Path, sig=signal.SIGKILL, timeout: float = 300) -> None:
    """Send ``sig`` to the whole process group once ``cond()``; for SIGKILL, reap it."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the planned signal:\n"
                        + log_path.read_text()[-3000:])
        assert time.monotonic() < end, "no progress"
        time.sleep(0.005)
    os.killpg(proc.pid, sig)
    if sig == signal.SIGKILL:
        proc.wait(timeout=30)
