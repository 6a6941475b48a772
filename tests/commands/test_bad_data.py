"""The commands stop on bad data with exit code 2 and one line naming the file (and line), no traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.dist import run_cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "train.yaml"

pytestmark = pytest.mark.timeout(180)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        env.pop(var, None)
    return run_cli(list(args), cwd=str(REPO), env=env, timeout=150)


def test_train_names_the_bad_corpus_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "1+1=2"}\n' * 50 + b'{"text": "1+\xff"}\n')
    proc = _cli("train", str(TINY), f"run_dir={tmp_path / 'run'}", f"data.path={corpus}", "training.steps=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{corpus}:51: invalid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_refuses_an_empty_stage(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    stages = json.dumps([{"name": "s1", "data": str(empty), "seq_length": 64}])
    proc = _cli("sft", "examples/tiny/sft.yaml", f"run_dir={tmp_path / 'run'}", f"stages={stages}",
                "data.num_workers=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"stages[0] (s1).data: {empty}: empty dataset" in proc.stderr and "Traceback" not in proc.stderr
