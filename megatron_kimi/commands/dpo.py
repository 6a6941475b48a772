"""``megatron-kimi dpo CONFIG.yaml``: DPO on preference pairs; Kimi k1.5's long2short (§2.4).

Starts from ``checkpoint.load`` (typically the long-CoT model), which is also the frozen reference:
its log-probs of every pair are computed once before training and cached in the run dir
(megatron_kimi/dpo/batching.py), then only the policy runs. Pairs come from a pairs jsonl or from
``sample``'s output by the paper's rule (megatron_kimi/dpo/data.py); the loss and the metrics are TRL's
(megatron_kimi/dpo/loss.py: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``). The data position (packs consumed) is in
every checkpoint, so a resumed run sees the same batches; it reads the reference from the cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.commands.common import Job, Run, run_job
from megatron_kimi.config import DPOConfig
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.dpo import loss as dpo_loss
from megatron_kimi.dpo.batching import (
    DPOPairSource,
    checkpoint_fingerprint,
    compute_reference,
    fit_pairs,
    load_reference,
    make_dpo_forward_step,
    reference_key,
    reference_path,
    save_reference,
)
from megatron_kimi.dpo.data import build_or_load_pairs, describe
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.runtime import DistContext, build_training_bundle
from megatron_kimi.training.trainer import Trainer


def run(cfg: DPOConfig) -> int:
    return run_job(cfg, lambda ctx, start: build_job(cfg, ctx, start))


def cache_dir(cfg: DPOConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.run_dir) / "cache")


def prepare_pairs(cfg: DPOConfig, is_rank0: bool):
    """Tokenizer and tokenized pairs: rank 0 tokenizes (or finds the cache), then the others read it; a
    data error on rank 0 is raised on every rank."""
    cache = cache_dir(cfg)
    pairs, error = None, None
    if is_rank0:
        try:
            pairs = build_or_load_pairs(cfg, cache)
        except Exception as e:  # noqa: BLE001 - told to every rank, then raised here as it is
            error = (isinstance(e, ValueError), str(e))
            dist.broadcast_object_list([error], src=0)
            raise
    payload = [error]
    dist.broadcast_object_list(payload, src=0)
    if payload[0] is not None:  # the other ranks: rank 0's data error
        data_error, text = payload[0]
        raise (ValueError if data_error else RuntimeError)(text if data_error else f"rank 0 failed on the pairs: {text}")
    if pairs is None:
        pairs = build_or_load_pairs(cfg, cache)
    return load_tokenizer(cfg.data.tokenizer, cache), pairs


def _reference_of_run(start: Path) -> dict:
    """What a DPO run recorded in its checkpoint ``start`` about its reference: ``reference`` (the
    checkpoint, or None: the seeded initialization), its ``fingerprint`` and the cache ``reference_key``."""
    saved = ckpt.read_common(start).get("dpo")
    if not saved:
        raise ValueError(f"{start}: not a checkpoint of a dpo run (no reference recorded); set checkpoint.resume=false "
                         "or another run_dir to start a new run from it")
    return saved


def build_job(cfg: DPOConfig, ctx: DistContext, start: Optional[Path]) -> Job:
    t = cfg.training
    tokenizer, pairs = prepare_pairs(cfg, ctx.is_rank0)
    view, overlong = fit_pairs(pairs, t.seq_length, cfg.data.overlong)
    if len(view) == 0:
        raise ValueError(f"data.pairs: no pairs to train on ({describe(pairs)}; {overlong} longer than "
                         f"training.seq_length={t.seq_length})")
    source = DPOPairSource(view, t.seq_length, t.global_batch_size, parallel_state.get_data_parallel_rank(),
                           ctx.dp_size, t.seed, pad_id=tokenizer.pad_token_id)
    steps = source.total_steps(t.epochs)
    if steps == 0:
        raise ValueError(f"training.global_batch_size={t.global_batch_size}: {len(view)} pairs make "
                         f"{len(source.plan(0).bins)} packs of seq_length {t.seq_length}, fewer than one global batch")
    total = min(steps, t.max_steps) if t.max_steps is not None else steps
    bundle = build_training_bundle(cfg, len(tokenizer), total_steps=steps)
    trainer = Trainer(bundle, make_dpo_forward_step(cfg.dpo), t.seq_length, micro_batch_size=1, loss_key="dpo",
                      max_consecutive_nan_steps=t.max_consecutive_nan_steps)

    # The reference: a new run's start point (checkpoint.load, or the seeded init without one); a resumed
    # run's, as its checkpoint recorded it.
    _, own = ckpt.start_point(cfg.run_dir, cfg.checkpoint.resume, cfg.checkpoint.load)
    if own:
        saved = _reference_of_run(start)
        ref_ckpt = Path(saved["reference"]) if saved.get("reference") else None
        fingerprint = saved["fingerprint"]
    else:
        ref_ckpt, fingerprint = start, checkpoint_fingerprint(start)
    ref_name = str(ref_ckpt) if ref_ckpt else "the seeded initialization"
    key = reference_key(cfg, view, fingerprint)
    if own and saved["reference_key"] != key:
        raise ValueError(f"{start}: this run's reference log-probs no longer match: the pairs, training.seq_length or "
                         "the model config changed since the run started; restore them, or start a new run "
                         "(another run_dir)")
    ref_file = reference_path(cache_dir(cfg), key)
    source.reference = load_reference(ref_file, key, len(view))
    notes = []
    if source.reference is not None:
        notes.append(f"dpo: reference log-probs of {len(view)} pairs loaded from {ref_file}")
    elif own and checkpoint_fingerprint(ref_ckpt) != fingerprint:
        raise ValueError(f"{ref_file}: the cached reference log-probs of this run are gone, and its reference "
                         f"checkpoint {ref_name} changed or is gone since the run started, so they cannot be "
                         "recomputed exactly; restore one of them, or start a new run (another run_dir)")

    def reference_now(where: str) -> None:
        t0 = time.perf_counter()
        values = compute_reference(trainer.model, source)
        if ctx.is_rank0:
            save_reference(ref_file, key, values, {"reference": str(ref_ckpt) if ref_ckpt else None,
                                                   "pairs": len(view), "data": pairs.source})
        dist.barrier()
        source.reference = values
        notes.append(f"dpo: reference log-probs of {len(view)} pairs computed {where} in "
                     f"{time.perf_counter() - t0:.1f} s, cached in {ref_file}")

    if source.reference is None and own:
        # Resumed without the cache: the reference weights first (run_job loads the resumed state after this).
        if ref_ckpt is not None:
            trainer.load(ref_ckpt, load_optimizer=False)
        reference_now(f"from {ref_name} (not in the cache)")
    history: list = []

    def fit(run: Run) -> None:
        if source.reference is None:  # a new run: the weights are the reference's now
            reference_now(f"from {ref_name}")
        for note in notes:
            run.writer.print(note)
        run.checkpointer.extra["dpo"] = {"reference": fingerprint["checkpoint"], "fingerprint": fingerprint,
                                         "reference_key": key}
        plan = source.plan(0)
        run.writer.print(
            f"dpo: {describe(pairs)}; {overlong} longer than seq_length {t.seq_length} left out; {len(view)} pairs "
            f"in {plan.stats['bins']} packs (efficiency {plan.efficiency:.3f}); {steps} steps x {t.global_batch_size} "
            f"packs over {t.epochs} epoch(s); loss {cfg.dpo.loss}, beta {cfg.dpo.beta}")

        def named(metrics: dict, report: dict) -> None:
            # the epoch of the step's packs, and TRL's names for the step report ("pairs", not "loss_tokens")
            metrics["epoch"] = source.locate(trainer.state.consumed_samples - source.global_batch_size)[0]
            metrics.pop("loss_tokens")
            metrics.update(dpo_loss.metrics(report))

        history.extend(trainer.fit(source, run.writer, total, run.checkpointer, tokens_per_sample=t.seq_length,
                                   report_metrics=named))

    def summary(run: Run) -> None:
        if history:
            a, b = history[0], history[-1]
            print(f"dpo: loss {a['loss']:.4f} -> {b['loss']:.4f}, rewards/margins {a['rewards/margins']:.4f} -> "
                  f"{b['rewards/margins']:.4f}, rewards/accuracies {a['rewards/accuracies']:.3f} -> "
                  f"{b['rewards/accuracies']:.3f}, logps/chosen {a['logps/chosen']:.2f} -> {b['logps/chosen']:.2f}, "
                  f"logps/rejected {a['logps/rejected']:.2f} -> {b['logps/rejected']:.2f} over steps "
                  f"{a['step']}..{trainer.state.step}; run dir {run.run_dir}", flush=True)
        (run.run_dir / "dpo_data.json").write_text(json.dumps(
            {"data": pairs.stats, "overlong_dropped": overlong, "pairs": len(view), "packing": source.plan(0).stats,
             "steps": steps, "reference": str(ref_ckpt) if ref_ckpt else None, "reference_cache": str(ref_file)},
            indent=1, default=str))

    return Job(trainer, total=total, fit=fit, summary=summary, weights_only_warm_start=True)
