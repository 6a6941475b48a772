"""Offline resharding: rewrite a checkpoint for another TP/PP (and virtual-pipeline) layout.

``python tools/reshard_checkpoint.py SRC OUT --tp 2 --pp 2 [--vpp 2] [--no-optimizer] [--force]``

Checkpoints are Megatron ``dist_checkpointing`` (torch_dist) directories that already load at any
layout, so resharding is a real load at the *target* layout followed by a save: one CPU rank per
target model-parallel rank (tp x pp, gloo) builds the model (and optimizer) from the checkpoint's own
config, loads the source, and saves ``OUT/iter_N`` + ``OUT/latest`` with the same step, data position
and LR-scheduler state. The result records the target layout (``inspect_checkpoint`` shows it) and
resumes there (``checkpoint.load=OUT`` or copy it into a run's ``checkpoints/``). What it buys over
loading the source directly: the new layout is checked (shapes, divisibility, optimizer kind) once,
offline, and e.g. ``mcore-to-hf`` exports and later loads read the layout they will be used at.
The RNG state saved is the reshard process's (RNG streams do not map between layouts anyway).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Optional

from megatron_kimi.ckpt_tools.inspect import find_checkpoint, verify
from megatron_kimi.config import (
    ConfigError,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    TrainConfig,
    TrainingConfig,
    build_config,
    to_dict,
)
from megatron_kimi.training.ckpt_paths import CheckpointError, iter_dir_name

_STANDARD = {"model", "optimizer", "optimizer_kind", "scheduler", "train_state", "layout", "format_version",
             "contents", "content_metadata", "rng_state"}


class _SavedScheduler:
    """Hands the source's scheduler state through to the new checkpoint unchanged."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def target_config(common: dict, tp: int, pp: int, vpp: Optional[int]) -> TrainConfig:
    """A TrainConfig with the source's model/optimizer/precision sections at the target layout."""
    saved = dict(common.get("config") or {})
    if "model" not in saved:
        raise CheckpointError("the checkpoint has no saved config (config.model): cannot rebuild its model")
    par = dict(saved.get("parallel") or {})
    par.update(tensor=tp, pipeline=pp, virtual_pipeline=vpp, context=1)
    if tp == 1:
        par["sequence_parallel"] = False
    par["distributed_optimizer"] = common.get("optimizer_kind") == "distributed"
    sections = {
        "run_dir": "<reshard>",
        "model": saved["model"],
        "parallel": {k: v for k, v in par.items() if k in {f.name for f in dataclasses.fields(ParallelConfig)}},
        "optimizer": _known(saved.get("optimizer") or {}, OptimizerConfig),
        "precision": _known(saved.get("precision") or {}, PrecisionConfig),
        "recompute": _known(saved.get("recompute") or {}, RecomputeConfig),
        "training": {"steps": 1, "global_batch_size": 1, "micro_batch_size": 1,
                     "seq_length": max(2 * tp, 2), "seed": int((saved.get("training") or {}).get("seed", 1234))},
    }
    sections["model"] = _known(sections["model"], ModelConfig)
    try:
        return build_config(TrainConfig, sections, source=f"target layout tp={tp} pp={pp} vpp={vpp}")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _known(d: dict, cls: type) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _reshard_rank(plan: dict) -> None:
    from megatron_kimi.cli import quiet_warnings
    from megatron_kimi.platform import cpu_emulation

    quiet_warnings()

    cpu_emulation.activate()  # before Megatron is imported
    from megatron_kimi.training import checkpoint as ckpt
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown

    cfg: TrainConfig = plan["cfg"]
    initialize(cfg)
    try:
        bundle = build_training_bundle(cfg, plan["vocab_size"], total_steps=1)
        optimizer = bundle.optimizer if plan["with_optimizer"] else None
        ckpt.load(plan["src"], bundle.model, optimizer, None)
        scheduler = _SavedScheduler(plan["scheduler"]) if (optimizer is not None and plan["scheduler"]) else None
        ckpt.save(plan["out"], plan["step"], bundle.model, optimizer, scheduler, plan["train_state"],
                  extra=plan["extra"])
    finally:
        shutdown()


def reshard(src: str | Path, out: str | Path, tp: int, pp: int, vpp: Optional[int] = None,
            with_optimizer: bool = True, force: bool = False, timeout: float = 3600.0) -> Path:
    """Returns the new checkpoint directory (``OUT/iter_N``)."""
    from megatron_kimi.convert.hf_to_mcore import launch_local

    ckpt_dir = find_checkpoint(src)
    meta, common, _ = verify(ckpt_dir)
    if tp < 1 or pp < 1 or (vpp is not None and vpp < 2):
        raise CheckpointError(f"bad target layout tp={tp} pp={pp} vpp={vpp} (tp, pp >= 1; vpp >= 2 or unset)")
    cfg = target_config(common, tp, pp, vpp)
    emb = meta.state_dict_metadata.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{ckpt_dir}: no embedding.word_embeddings.weight tensor")
    vocab = int(emb.size[0])
    if vocab % tp:
        raise CheckpointError(f"{ckpt_dir}: the padded vocabulary ({vocab}) is not divisible by tp={tp}")
    train_state = dict(common.get("train_state", {}))
    step = int(train_state.get("step", 0))
    out = Path(out)
    final = out / iter_dir_name(step)
    if out.resolve() == ckpt_dir.parent.resolve():
        raise CheckpointError(f"{out}: the output must not be the source's checkpoints dir")
    if final.exists():
        if not force:
            raise CheckpointError(f"{final} exists (pass --force to overwrite)")
        shutil.rmtree(final)
    has_optim = "optimizer" in common.get("contents", [])
    extra = {k: v for k, v in common.items() if k not in _STANDARD}
    saved_cfg = dict(extra.get("config") or {})
    saved_cfg["parallel"] = {**(saved_cfg.get("parallel") or {}), **to_dict(cfg.parallel)}
    extra["config"] = saved_cfg
    plan = {"cfg": cfg, "src": str(ckpt_dir), "out": str(out), "step": step, "train_state": train_state,
            "vocab_size": vocab, "with_optimizer": with_optimizer and has_optim,
            "scheduler": common.get("scheduler"), "extra": extra}
    launch_local(_reshard_rank, tp * pp, plan, timeout=timeout)
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reshard_checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("src", help="run dir, checkpoints/ dir or iter_N dir")
    ap.add_argument("out", help="output checkpoints dir (gets iter_N/ and latest)")
    ap.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    ap.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    ap.add_argument("--vpp", type=int, default=None, help="target virtual-pipeline chunks per stage")
    ap.add_argument("--no-optimizer", action="store_true", help="write the weights only")
    ap.add_argument("--force", action="store_true", help="overwrite OUT/iter_N if it exists")
    args = ap.parse_args(argv)
    try:
        final = reshard(args.src, args.out, args.tp, args.pp, args.vpp, with_optimizer=not args.no_optimizer,
                        force=args.force)
    except (CheckpointError, ConfigError) as e:
        print(f"reshard_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"reshard_checkpoint: wrote {final} (tp {args.tp} x pp {args.pp}"
          + (f" x vpp {args.vpp}" if args.vpp else "") + ")")
    return 0
