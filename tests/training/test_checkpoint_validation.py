"""Loading a damaged checkpoint, or another model's, is a CheckpointError naming the file or tensor."""

from __future__ import annotations

import shutil

import pytest

from megatron_kimi.training import checkpoint as ckpt
from tests.dist import run_distributed


def save_then_load_other_models(rank, world_size, run_dir, ckpt_root):
    """Save the harness model after one step; then try to load it into two other model shapes."""
    from megatron_kimi.config import load_config
    from megatron_kimi.training.runtime import build_training_bundle, shutdown
    from tests.parallel.harness import BASE, setup_layout

    cfg, source, bundle, trainer = setup_layout([], run_dir, 2)
    try:
        trainer.train_step(source.microbatches(0))
        trainer.state.step = 1
        saved = trainer.save(ckpt_root)
        errors = {}
        for name, override in (("hidden", "model.hidden_size=32"), ("layers", "model.num_layers=2")):
            other = build_training_bundle(load_config(None, BASE + [override, f"run_dir={run_dir}"]),
                                          bundle.vocab_size, 2)
            try:
                ckpt.load(saved, other.model, other.optimizer, other.scheduler)
                errors[name] = None
            except BaseException as e:  # noqa: BLE001 - report whatever escaped, to assert on its type
                errors[name] = (type(e).__name__, str(e))
        return str(saved), errors
    finally:
        shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    path, errors = run_distributed(save_then_load_other_models, 1, str(root / "run"), str(root / "ckpt"),
                                   timeout=240)[0]
    return path, errors


@pytest.mark.parametrize(
    "which, expected",
    [
        ("hidden", "tensor 'decoder.layers.mlp.linear_fc1.weight' has shape (4, 256, 64) in the checkpoint, "
                   "this model expects (4, 256, 32)"),
        ("layers", "tensor 'decoder.layers.mlp.linear_fc1.weight' has shape (4, 256, 64) in the checkpoint, "
                   "this model expects (2, 256, 64)"),
    ],
)
def test_another_models_checkpoint_names_the_tensor_and_both_shapes(saved, which, expected):
    path, errors = saved
    assert errors[which] is not None, "a checkpoint of another model loaded"
    kind, msg = errors[which]
    assert kind == "CheckpointError", (kind, msg)
    assert msg.startswith(f"{path}: a checkpoint of another model") and expected in msg, msg


def _copy(saved, tmp_path):
    dst = tmp_path / "iter_0000001"
    shutil.copytree(saved[0], dst)
    return dst


def _shards(path):
    files = sorted(path.glob("*.distcp"))
    assert files, list(path.iterdir())
    return files


def test_missing_shard_file_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    gone = _shards(path)[0]
    gone.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{gone}: shard file missing"):
        ckpt.load(path, [])  # checked before any tensor is read (no process group needed)


def test_truncated_shard_file_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    shard = max(_shards(path), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match=f"{shard}: truncated"):
        ckpt.load(path, [])


@pytest.mark.parametrize("name", ["common.pt", ".metadata", "metadata.json"])
def test_truncated_or_missing_index_files_are_named(saved, tmp_path, name):
    path = _copy(saved, tmp_path)
    f = path / name
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*{name}"):
        ckpt.load(path, [])
    f.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*{name}"):
        ckpt.load(path, [])
