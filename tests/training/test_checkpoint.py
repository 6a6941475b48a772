"""Checkpoints: resharding across layouts, kill-and-resume exactness, atomic saves, clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_kimi.training import checkpoint as ckpt
from tests.dist import run_distributed
from tests.training.bodies import load_and_continue, save_after_one_step, save_and_die_during_second_save

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    out = run_distributed(save_after_one_step, 2, ["parallel.tensor=2", "parallel.distributed_optimizer=true"],
                          str(root / "run"), str(root / "ckpt"), timeout=240)
    return root / "ckpt" / "iter_0000001", out


@pytest.mark.parametrize(
    "world,overrides",
    [
        (1, ["parallel.distributed_optimizer=true"]),
        (2, ["parallel.pipeline=2", "parallel.distributed_optimizer=true"]),
        (2, ["parallel.distributed_optimizer=true"]),  # DP=2, optimizer state resharded over DP
    ],
    ids=["tp1", "pp2", "dp2_distopt"],
)
def test_tp2_checkpoint_loads_at_other_layouts(tp2_checkpoint, world, overrides, tmp_path):
    ckpt_dir, saved = tp2_checkpoint
    out = run_distributed(load_and_continue, world, overrides, str(tmp_path / "run"), str(ckpt_dir), timeout=240)
    ref_logits = saved[0]["logits"]
    got = [r["logits"] for r in out if r["logits"] is not None]
    assert got, "no rank reported logits"
    for logits in got:
        for a, b in zip(ref_logits, logits):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    # The next optimizer step (model + Adam moments + LR schedule all restored) matches too.
    for r in out:
        assert math.isclose(r["loss2"], saved[0]["loss2"], rel_tol=1e-5), (r["loss2"], saved[0]["loss2"])


def test_optimizer_kind_mismatch_is_a_clear_error(tp2_checkpoint, tmp_path):
    ckpt_dir, _ = tp2_checkpoint
    with pytest.raises(RuntimeError, match="saved by the distributed optimizer"):
        run_distributed(load_and_continue, 1, [], str(tmp_path / "run"), str(ckpt_dir), timeout=240)


def _torchrun(args, run_dir, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_kimi",
           "train", "examples/tiny/train.yaml", *args, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


ARGS = ["training.steps=8", "optimizer.decay_steps=8", "optimizer.warmup_steps=2", "checkpoint.save_interval=3",
        "parallel.distributed_optimizer=true", "logging.progress_bar=false", "data.builtin_num_lines=3000"]


def test_kill_and_resume_continues_the_same_loss_curve(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with open(tmp_path / "straight.log", "w") as log:
        assert _torchrun(ARGS, straight, log).wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()
    with open(tmp_path / "killed.log", "w") as log:
        proc = _torchrun(ARGS, killed, log)
        deadline = time.time() + 240
        while time.time() < deadline:  # kill -9 the whole job once step 5 is logged (ckpt at 3)
            metrics = killed / "metrics.jsonl"
            if metrics.is_file() and any(json.loads(l)["step"] >= 5 for l in metrics.read_text().splitlines() if l):
                break
            if proc.poll() is not None:
                pytest.fail("run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text())
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert (killed / "checkpoints" / "latest").read_text().strip() in ("iter_0000003", "iter_0000006")
    with open(tmp_path / "resume.log", "w") as log:
        assert _torchrun(ARGS, killed, log).wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    a, b = _losses(straight), _losses(killed)
    assert [r["step"] for r in b] == list(range(1, 9))  # nothing lost, nothing repeated
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)


def test_killed_save_keeps_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="exited with code 3"):
        run_distributed(save_and_die_during_second_save, 1, str(tmp_path / "run"), str(root), timeout=240)
    assert (root / "iter_0000002.tmp").is_dir()  # the half-finished save
    assert not (root / "iter_0000002").exists()
    assert ckpt.resolve(root) == root / "iter_0000001"
    assert ckpt.read_common(root / "iter_0000001")["train_state"]["step"] == 1


def test_bad_checkpoints_give_clear_errors(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "latest").write_text("iter_0000009\n")
    with pytest.raises(ckpt.CheckpointError, match="iter_0000009"):
        ckpt.resolve(root)
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "common.pt").write_text("not a torch file")
    with pytest.raises(ckpt.CheckpointError, match="bogus"):
        ckpt.read_common(bogus)
    assert ckpt.resolve(tmp_path / "nothing-here") is None
