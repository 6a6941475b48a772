"""Sharded checkpoints with Megatron ``dist_checkpointing``: atomic, resumable, reshardable.

Layout on disk::

    checkpoints/
      latest                  # text: name of the newest complete checkpoint ("iter_0000100")
      iter_0000100/           # a dist_checkpointing directory (torch_dist format)

A save writes ``iter_N.tmp`` and renames it to ``iter_N`` only after every rank finished, then
replaces ``latest`` atomically: a save killed half-way leaves the last good checkpoint untouched
(the stale ``.tmp`` is removed by the next save). The model, optimizer (distributed optimizer in
the ``fully_reshardable`` format), LR scheduler, RNG and the trainer's state (step, data position)
are saved; a checkpoint loads at another TP/PP/DP layout (RNG is only restored at the same layout).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint.api import CheckpointException

from megatron_kimi.ckpt_tools.inspect import verify as verify_files
from megatron_kimi.megatron_fixes import dist_optimizer_checkpoint as optim_fix
from megatron_kimi.model.sharding import unwrap
from megatron_kimi.training.ckpt_paths import LATEST, CheckpointError, iter_dir_name, resolve  # noqa: F401

FORMAT_VERSION = 1
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def start_point(run_dir: str | Path, resume: bool, load: Optional[str]) -> tuple[Optional[Path], bool]:
    """Where a run starts: (its own latest checkpoint, True) when resuming, else (``load``, False),
    else (None, False). A ``load`` path without a checkpoint is an error naming it."""
    own = resolve(Path(run_dir) / "checkpoints") if resume else None
    if own is not None:
        return own, True
    if load:
        found = resolve(load)
        if found is None:
            raise CheckpointError(f"checkpoint.load={load!r}: no checkpoint there")
        return found, False
    return None, False


def _model_sharded_sd(chunks: List) -> Dict[str, Any]:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> Dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def optimizer_kind(optimizer) -> str:
    leaves = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(optim_fix._is_distributed(o) for o in leaves) else "plain"


def _state_dict(chunks, optimizer, scheduler, train_state: dict, extra: dict, is_loading: bool, with_rng: bool):
    sd = _model_sharded_sd(chunks)
    if optimizer is not None:
        model_sd = sd["model"] if len(chunks) == 1 else sd
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA)
        sd["optimizer_kind"] = optimizer_kind(optimizer)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = dict(train_state)
    sd["layout"] = layout()
    sd["format_version"] = FORMAT_VERSION
    sd["contents"] = [k for k in ("model", "optimizer", "scheduler") if k in sd or (k == "model" and chunks)]
    sd.update(extra)
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(_rng_state() if not is_loading else None)
    return sd


def save(
    ckpt_root: str | Path,
    step: int,
    chunks: List,
    optimizer,
    scheduler,
    train_state: dict,
    extra: Optional[dict] = None,
    keep_last: int = 0,
) -> Path:
    """Save a complete checkpoint for ``step`` atomically; returns its directory."""
    root = Path(ckpt_root)
    final = root / iter_dir_name(step)
    tmp = root / (iter_dir_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    if optimizer is not None:
        optim_fix.ensure_state_initialized(optimizer)
    sd = _state_dict(chunks, optimizer, scheduler, train_state, extra or {}, is_loading=False, with_rng=True)
    dist_checkpointing.save(sd, str(tmp), content_metadata=_OPTIM_METADATA)
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, final.name)
        _prune(root, keep_last, final.name)
    dist.barrier()
    return final


def write_latest(root: Path, name: str) -> None:
    """``root/latest`` names ``name``, atomically and durably (file and directory fsynced)."""
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    try:
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _prune(root: Path, keep_last: int, newest: str) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def read_common(ckpt_dir: str | Path) -> dict:
    """The non-sharded part (train_state, scheduler, layout, config ...) without loading tensors."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except Exception as e:  # noqa: BLE001 - surface the path with the cause
        raise CheckpointError(f"{ckpt_dir}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def _sharded_tensors(tree) -> List[ShardedTensor]:
    out = []
    for v in nested_values(tree):
        if isinstance(v, ShardedTensorFactory):
            out += _sharded_tensors(v.build())
        elif isinstance(v, ShardedTensor):
            out.append(v)
    return out


def check_model_shapes(ckpt_dir: Path, sd: dict, index) -> None:
    """:class:`CheckpointError` unless every model tensor is in the checkpoint with the same global shape."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problems = []
    for part in sorted(k for k in sd if k == "model" or (k.startswith("model") and k[5:].isdigit())):
        for sh in _sharded_tensors(sd[part]):
            saved = index.state_dict_metadata.get(sh.key)
            if not isinstance(saved, TensorStorageMetadata):
                problems.append(f"tensor {sh.key!r} is not in the checkpoint")
            elif tuple(saved.size) != tuple(sh.global_shape):
                problems.append(f"tensor {sh.key!r} has shape {tuple(saved.size)} in the checkpoint, this model "
                                f"expects {tuple(sh.global_shape)}")
    if problems:
        problems = sorted(set(problems))
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{ckpt_dir}: a checkpoint of another model: {'; '.join(problems[:3])}{more}. "
                              "Compare the model.* settings with the checkpoint's config "
                              "(tools/inspect_checkpoint.py)")


def load(
    ckpt_dir: str | Path,
    chunks: List,
    optimizer=None,
    scheduler=None,
    strict: bool = True,
) -> dict:
    """Load into ``chunks`` (and optimizer/scheduler if given); returns the saved train_state.

    Before any rank reads a tensor, the files are checked (a missing or truncated shard, index or
    common.pt is a :class:`CheckpointError` naming the file) and so are the model's tensor keys and
    global shapes against the index (another model's checkpoint names the tensor and both shapes)."""
    ckpt_dir = Path(ckpt_dir)
    index, _, _ = verify_files(ckpt_dir)
    common = read_common(ckpt_dir)
    same_layout = common.get("layout") == layout()
    if optimizer is not None:
        saved_kind, kind = common.get("optimizer_kind"), optimizer_kind(optimizer)
        if saved_kind != kind:
            raise CheckpointError(
                f"{ckpt_dir}: optimizer state was saved by the {saved_kind} optimizer, this run uses the "
                f"{kind} one (parallel.distributed_optimizer); set checkpoint.load_optimizer=false to "
                "load the weights only"
            )
        optim_fix.ensure_state_initialized(optimizer)
    # RNG only with the full training state (a weights-only load keeps this run's seeding).
    with_rng = same_layout and optimizer is not None
    sd = _state_dict(chunks, optimizer, scheduler, {}, {}, is_loading=True, with_rng=with_rng)
    sd.pop("train_state")
    sd.pop("layout")
    sd.pop("format_version")
    sd.pop("contents")
    sd.pop("optimizer_kind", None)
    if scheduler is not None:
        sd.pop("scheduler")
    check_model_shapes(ckpt_dir, sd, index)
    try:
        loaded = dist_checkpointing.load(sd, str(ckpt_dir), strict="assume_ok_unexpected")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        raise CheckpointError(f"{ckpt_dir}: failed to load ({type(e).__name__}: {e})") from None
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"], strict=strict)
    if optimizer is not None:
        optim_fix.load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if with_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    return dict(common.get("train_state", {}))
