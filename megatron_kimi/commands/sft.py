"""``megatron-kimi sft CONFIG.yaml``: packed SFT over one or more stages.

Kimi k1.5 (§2.5): 1 epoch at 32k with lr 2e-5 -> 2e-6, then 1 epoch at 128k re-warmed to 1e-5 and
decayed to 1e-6; long-CoT warm-up SFT is the same command on other data. Every stage has its own
data, seq_length, epochs and LR schedule; the optimizer state carries over between stages. Loss is the
mean over all assistant tokens of the global batch. The data position (stage, packs consumed) is in
every checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.commands.common import Job, Run, run_job
from megatron_kimi.config import SFTConfig, SFTStageConfig
from megatron_kimi.data.chat_synth import generate_chat_arithmetic
from megatron_kimi.data.image_sft import BUILTIN_IMAGE_TASK, ImageSFTSet, PackedImageSFTSource, builtin_image_jsonl
from megatron_kimi.data.images import ImageProcessing
from megatron_kimi.data.sft_cache import build_or_load_cache
from megatron_kimi.data.sft_source import PackedSFTSource
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.lm_step import lm_forward_step
from megatron_kimi.training.optim import build_scheduler
from megatron_kimi.training.runtime import DistContext, build_training_bundle
from megatron_kimi.training.trainer import Trainer

BUILTIN_CHAT = "builtin:chat-arithmetic"


def _stage_data_path(cfg: SFTConfig, stage: SFTStageConfig, cache: Path) -> Path:
    if stage.data == BUILTIN_CHAT:
        d = cfg.data
        tag = f"{'cot' if d.builtin_long_cot else 'plain'}_op{d.builtin_operands}_mt{int(d.builtin_multi_turn)}"
        tag += f"_slip{d.builtin_carry_slip:g}" if d.builtin_carry_slip else ""
        tag += f"_checks{d.builtin_checks}" if d.builtin_checks else ""
        return cache / f"chat_arithmetic_{tag}_{d.builtin_num_samples}_{cfg.training.seed}.jsonl"
    if stage.data == BUILTIN_IMAGE_TASK:
        slip = f"_slip{cfg.data.builtin_carry_slip:g}" if cfg.data.builtin_carry_slip else ""
        return cache / f"image_count_{cfg.data.builtin_num_samples}_{cfg.training.seed}{slip}" / "data.jsonl"
    return Path(stage.data)


def prepare_stage_caches(cfg: SFTConfig, is_rank0: bool):
    """Tokenizer + one token cache per stage; rank 0 builds, the others then open the same files."""
    cache = Path(cfg.data.cache_dir or Path(cfg.run_dir) / "cache")
    paths = [_stage_data_path(cfg, st, cache) for st in cfg.stages]
    for st, path in zip(cfg.stages, paths):
        if st.data not in (BUILTIN_CHAT, BUILTIN_IMAGE_TASK) and not path.is_file():
            raise ValueError(f"stages ({st.name}).data: {path} does not exist")
    if cfg.model.vision is not None:
        return prepare_image_sets(cfg, paths, cache, is_rank0)

    def build():
        for st, path in zip(cfg.stages, paths):
            if st.data == BUILTIN_CHAT and not path.is_file():
                generate_chat_arithmetic(path, cfg.data.builtin_num_samples, seed=cfg.training.seed,
                                         long_cot=cfg.data.builtin_long_cot, operands=cfg.data.builtin_operands,
                                         multi_turn=cfg.data.builtin_multi_turn,
                                         carry_slip=cfg.data.builtin_carry_slip, checks=cfg.data.builtin_checks)
        # forkserver: this process already runs torch.distributed threads, which fork() must not copy.
        return [build_or_load_cache(p, cfg.data.tokenizer, cache, num_workers=cfg.data.num_workers,
                                    on_error=cfg.data.on_error, mp_context="forkserver") for p in paths]

    if is_rank0:
        build()
    dist.barrier()
    caches = build() if not is_rank0 else [build_or_load_cache(p, cfg.data.tokenizer, cache, num_workers=1,
                                                               on_error=cfg.data.on_error) for p in paths]
    for i, (st, path, c) in enumerate(zip(cfg.stages, paths, caches)):
        if len(c) == 0:
            skipped = c.stats.get("malformed_skipped", 0)
            raise ValueError(f"stages[{i}] ({st.name}).data: {path}: empty dataset (no samples; "
                             f"{c.stats.get('lines', 0)} lines, {skipped} bad lines skipped)")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
    return tokenizer, caches


def prepare_image_sets(cfg: SFTConfig, paths, cache: Path, is_rank0: bool):
    """A VLM's stages: image chat jsonl held in memory (data/image_sft.py); rank 0 writes builtin data."""
    if is_rank0:
        for st, path in zip(cfg.stages, paths):
            if st.data == BUILTIN_IMAGE_TASK:
                builtin_image_jsonl(path, cfg.data.builtin_num_samples, cfg.training.seed, cfg.data.builtin_carry_slip)
    dist.barrier()
    tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
    processing = ImageProcessing(patch_size=cfg.model.vision.patch_size,
                                 merge_kernel_size=cfg.model.vision.merge_kernel_size)
    sets = [ImageSFTSet(p, tokenizer, cfg.data.image_token, processing, cfg.data.on_error) for p in paths]
    for i, (st, path, s) in enumerate(zip(cfg.stages, paths, sets)):
        if len(s) == 0:
            raise ValueError(f"stages[{i}] ({st.name}).data: {path}: empty dataset ({s.stats})")
    return tokenizer, sets


def stage_optimizer(cfg: SFTConfig, stage: SFTStageConfig, steps: int):
    return dataclasses.replace(cfg.optimizer, lr=stage.lr, min_lr=stage.min_lr, warmup_steps=stage.warmup_steps,
                               decay_style=stage.decay_style, decay_steps=max(steps, stage.warmup_steps + 1))


def run(cfg: SFTConfig) -> int:
    return run_job(cfg, lambda ctx, start: build_job(cfg, ctx, start))


def build_job(cfg: SFTConfig, ctx: DistContext, start: Optional[Path]) -> Job:
    tokenizer, caches = prepare_stage_caches(cfg, ctx.is_rank0)
    dp_rank = parallel_state.get_data_parallel_rank()
    pad_multiple = 2 * cfg.parallel.context if cfg.parallel.context > 1 else 1
    source_cls = PackedImageSFTSource if cfg.model.vision is not None else PackedSFTSource
    sources = [
        source_cls(c, st.seq_length, st.packs_per_step(), dp_rank, ctx.dp_size, cfg.training.seed,
                        pad_id=tokenizer.pad_token_id, overlong=cfg.data.overlong, pad_to_multiple=pad_multiple)
        for st, c in zip(cfg.stages, caches)
    ]
    stage_steps = [src.total_steps(st.epochs) for st, src in zip(cfg.stages, sources)]
    for i, (st, n) in enumerate(zip(cfg.stages, stage_steps)):
        if n == 0:
            raise ValueError(f"stages[{i}] ({st.name}): {len(caches[i])} samples make "
                             f"{len(sources[i].plan(0).bins)} packs of seq_length {st.seq_length}, fewer than "
                             f"one global batch of {st.packs_per_step()} packs")
    bundle = build_training_bundle(cfg, len(tokenizer), total_steps=max(stage_steps[0], 1))
    trainer = Trainer(bundle, lm_forward_step, cfg.stages[0].seq_length, micro_batch_size=1,
                      max_consecutive_nan_steps=cfg.training.max_consecutive_nan_steps)
    stage_idx = 0  # the stage a full-state checkpoint was saved in
    if start is not None:
        common = ckpt.read_common(start)
        if "optimizer" in common.get("contents", []):
            stage_idx = int(common.get("train_state", {}).get("stage", 0))
    # The LR schedule of that stage before the load, which restores its position.
    trainer.set_stage(stage_idx, cfg.stages[stage_idx].seq_length, build_scheduler(
        bundle.optimizer, stage_optimizer(cfg, cfg.stages[stage_idx], stage_steps[stage_idx]), stage_steps[stage_idx]))
    total = sum(stage_steps)
    if cfg.training.max_steps is not None:
        total = min(total, cfg.training.max_steps)
    history: list = []

    def fit(run: Run) -> None:
        stage_start = sum(stage_steps[:stage_idx])
        for i in range(stage_idx, len(cfg.stages)):
            st, src = cfg.stages[i], sources[i]
            scheduler = None
            if i != stage_idx:  # a fresh stage: new LR schedule, same optimizer state
                scheduler = build_scheduler(bundle.optimizer, stage_optimizer(cfg, st, stage_steps[i]), stage_steps[i])
            trainer.set_stage(i, st.seq_length, scheduler)
            plan = src.plan(0)
            run.writer.print(
                f"sft stage {i} ({st.name}): {len(src.cache)} samples, seq_length {st.seq_length}, "
                f"{stage_steps[i]} steps x {st.packs_per_step()} packs; epoch-0 packing efficiency "
                f"{plan.efficiency:.3f} ({plan.stats['bins']} packs; over-long: {plan.stats['truncated']} "
                f"truncated, {plan.stats['dropped']} dropped; bad lines skipped: "
                f"{src.cache.stats.get('malformed_skipped', 0)})"
            )
            end = min(stage_start + stage_steps[i], total)
            history.extend(trainer.fit(src, run.writer, end, run.checkpointer, tokens_per_sample=st.seq_length,
                                       extra_record={"stage": i, "packing_efficiency": plan.efficiency}))
            stage_start += stage_steps[i]
            if run.checkpointer.stopped or trainer.state.step >= total:
                break

    def summary(run: Run) -> None:
        if history:
            print(f"sft: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} over steps "
                  f"{history[0]['step']}..{trainer.state.step}; run dir {run.run_dir}", flush=True)
        (run.run_dir / "sft_stages.json").write_text(json.dumps(
            [{"stage": st.name, "steps": n, "packing": sources[i].plan(0).stats,
              "efficiency": sources[i].plan(0).efficiency} for i, (st, n) in enumerate(zip(cfg.stages, stage_steps))],
            indent=1, default=str))

    return Job(trainer, total=total, fit=fit, summary=summary, resume_note=f" (stage {stage_idx})")
