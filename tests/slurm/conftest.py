"""A real two-node Slurm for the ``slurm`` tests: started once per session by tests/slurm/cluster.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SLURM_DIR = os.environ.get("KIMI_SLURM_DIR", "/tmp/kimi-slurm")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the environment to run sbatch/scontrol with (SLURM_CONF set); stops the daemons after."""
    env = dict(os.environ, KIMI_SLURM_DIR=SLURM_DIR)
    out = subprocess.run(["bash", str(HERE / "cluster.sh"), "start"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"slurm cluster did not start:\n{out.stdout}\n{out.stderr}"
    env["SLURM_CONF"] = f"{SLURM_DIR}/slurm.conf"
    try:
        yield env
    finally:
        subprocess.run(["bash", str(HERE / "cluster.sh"), "stop"], env=env, capture_output=True, timeout=120)
