"""tools/inspect_checkpoint.py and tools/reshard_checkpoint.py on a real (tiny) distributed-optimizer run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoints import global_tensors

from megatron_kimi.ckpt_tools.inspect import inspect_checkpoint
from megatron_kimi.ckpt_tools.reshard import reshard
from megatron_kimi.training.ckpt_paths import CheckpointError

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["examples/tiny/train.yaml", "training.steps=6", "checkpoint.save_interval=3", "checkpoint.keep_last=0",
         "parallel.distributed_optimizer=true", "logging.tensorboard=false", "training.micro_batch_size=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _train(run: Path, *extra: str, nproc: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_kimi", "train", *TRAIN, f"run_dir={run}", *extra]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def _tool(name: str, *args: str):
    return subprocess.run([sys.executable, f"tools/{name}.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _losses(run: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt-tools") / "src"
    _train(run)
    return run


def test_inspect_reports_layout_step_config_and_tensors(source):
    info = inspect_checkpoint(source)  # a run dir: its latest checkpoint
    assert info.step == 6 and info.path.endswith("iter_0000006")
    assert info.layout == {"tp": 1, "pp": 1, "cp": 1, "dp": 2}
    assert info.optimizer_kind == "distributed" and info.contents == ["model", "optimizer", "scheduler"]
    assert info.config["model"]["hidden_size"] == 64
    names = {t.name: t for t in info.tensors}
    assert names["embedding.word_embeddings.weight"].shape == [128, 64]
    assert names["decoder.layers.mlp.linear_fc1.weight"].shape == [2, 512, 64]  # 2 layers stacked, SwiGLU fc1
    assert info.num_params == sum(t.numel for t in info.model_tensors) > 100_000
    out = _tool("inspect_checkpoint", str(source / "checkpoints" / "iter_0000003"), "--tensors")
    assert out.returncode == 0, out.stderr
    assert "step         3" in out.stdout and "tp 1 x pp 1 x cp 1 x dp 2" in out.stdout
    assert "decoder.final_layernorm.weight" in out.stdout
    js = _tool("inspect_checkpoint", str(source), "--json")
    assert json.loads(js.stdout)["train_state"]["consumed_samples"] == 6 * 16


@pytest.mark.parametrize("damage, message", [
    ("drop_shard", "shard file missing"),
    ("truncate_shard", "truncated"),
    ("drop_index", "missing .metadata"),
    ("drop_common", "missing common.pt"),
    ("corrupt_index", ".metadata: unreadable"),
])
def test_damaged_checkpoints_fail_with_the_file_named(source, tmp_path, damage, message):
    ckpt = tmp_path / "iter_0000003"
    shutil.copytree(source / "checkpoints" / "iter_0000003", ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    if damage == "drop_shard":
        shard.unlink()
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "drop_index":
        (ckpt / ".metadata").unlink()
    elif damage == "drop_common":
        (ckpt / "common.pt").unlink()
    else:
        (ckpt / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=message):
        reshard(ckpt, tmp_path / "out", tp=2, pp=1)  # refused before any rank starts
    assert not (tmp_path / "out").exists()
    if damage == "drop_shard":  # the command-line tools: exit code 2 and the message naming the file
        for tool, args in (("inspect_checkpoint", []), ("reshard_checkpoint", [str(tmp_path / "out"), "--tp", "2"])):
            out = _tool(tool, str(ckpt), *args)
            assert out.returncode == 2 and message in out.stderr and str(shard) in out.stderr, out.stderr[-2000:]


def test_unfinished_save_is_refused(source, tmp_path):
    tmp = tmp_path / "iter_0000009.tmp"
    shutil.copytree(source / "checkpoints" / "iter_0000003", tmp)
    with pytest.raises(CheckpointError, match="unfinished save"):
        inspect_checkpoint(tmp)


def test_bad_target_layout_is_refused_before_any_rank_starts(source, tmp_path):
    out = _tool("reshard_checkpoint", str(source), str(tmp_path / "o"), "--tp", "3")
    assert out.returncode == 2 and "parallel.tensor=3" in out.stderr, out.stderr[-1500:]


def test_reshard_to_tp2_pp2_keeps_every_tensor_and_resumes(source, tmp_path):
    src = source / "checkpoints" / "iter_0000003"
    out = _tool("reshard_checkpoint", str(src), str(tmp_path / "tp2pp2"), "--tp", "2", "--pp", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    new = tmp_path / "tp2pp2" / "iter_0000003"
    info = inspect_checkpoint(new)
    assert info.layout == {"tp": 2, "pp": 2, "cp": 1, "dp": 1} and info.step == 3
    assert info.config["parallel"]["tensor"] == 2 and info.train_state == inspect_checkpoint(src).train_state
    a, b = global_tensors(src), global_tensors(new)
    model_keys = {k for k in a if not k.startswith("optimizer.")}
    assert model_keys == {k for k in b if not k.startswith("optimizer.")}
    for k in model_keys:
        assert torch.equal(a[k], b[k]), k
    # the Adam moments survive too (as global tensors; the key layout may differ between formats)
    moments_a = sorted(float(v.double().abs().sum()) for k, v in a.items() if "exp_avg" in k)
    moments_b = sorted(float(v.double().abs().sum()) for k, v in b.items() if "exp_avg" in k)
    assert moments_a and moments_a == pytest.approx(moments_b, rel=1e-12)
    again = _tool("reshard_checkpoint", str(src), str(tmp_path / "tp2pp2"), "--tp", "2", "--pp", "2")
    assert again.returncode == 2 and "exists" in again.stderr

    # Resume at TP2 from the resharded checkpoint: steps 4..6 continue the source run's curve.
    run = tmp_path / "resumed"
    _train(run, "parallel.tensor=2", f"checkpoint.load={tmp_path / 'tp2pp2'}")
    got, want = _losses(run), _losses(source)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)
