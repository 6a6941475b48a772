"""Rank bodies for checkpoint tests (module-level for spawn)."""

from __future__ import annotations

import os

from tests.parallel.harness import BASE


def _setup(overrides, run_dir, steps):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron.core import parallel_state

    from megatron_kimi.commands.train import prepare_corpus
    from megatron_kimi.config import load_config
    from megatron_kimi.data.corpus import SequenceSampler
    from megatron_kimi.data.lm_source import LMBatchSource
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize
    from megatron_kimi.training.trainer import Trainer

    cfg = load_config(None, BASE + list(overrides) + [f"run_dir={run_dir}", f"training.steps={steps}"])
    ctx = initialize(cfg)
    tokenizer, corpus = prepare_corpus(cfg, ctx.is_rank0)
    t = cfg.training
    source = LMBatchSource(corpus, SequenceSampler(len(corpus), t.seed), t.global_batch_size,
                           t.micro_batch_size, parallel_state.get_data_parallel_rank(), ctx.dp_size)
    bundle = build_training_bundle(cfg, len(tokenizer), steps)
    trainer = Trainer(bundle, lm_forward_step, t.seq_length, t.micro_batch_size)
    return cfg, source, bundle, trainer


def _probe_logits(bundle, source, seq_length):
    from megatron_kimi.training.lm_step import forward_logits

    # The same two micro-batches on every rank (not DP-sliced): the first 4 samples.
    from megatron_kimi.data.corpus import make_batch

    mbs = [make_batch(source.corpus, [0, 1]), make_batch(source.corpus, [2, 3])]
    out = forward_logits(bundle.model, mbs, seq_length)
    return None if out is None else [o.clone() for o in out]


def save_after_one_step(rank, world_size, overrides, run_dir, ckpt_root):
    """Train 1 step, save, report the logits and the loss of a 2nd step (from the same state)."""
    from megatron_kimi.training.runtime import shutdown

    cfg, source, bundle, trainer = _setup(overrides, run_dir, 2)
    try:
        trainer.train_step(source.microbatches(0))
        trainer.state.step, trainer.state.consumed_samples = 1, cfg.training.global_batch_size
        trainer.save(ckpt_root)
        logits = _probe_logits(bundle, source, cfg.training.seq_length)
        second = trainer.train_step(source.microbatches(cfg.training.global_batch_size))
        return {"logits": logits, "loss2": second["loss"]}
    finally:
        shutdown()


def load_and_continue(rank, world_size, overrides, run_dir, ckpt_dir):
    """Load at this layout; report the logits and the loss of the next step."""
    from megatron_kimi.training.runtime import shutdown

    cfg, source, bundle, trainer = _setup(overrides, run_dir, 2)
    try:
        trainer.load(ckpt_dir)
        assert trainer.state.step == 1 and trainer.state.consumed_samples == cfg.training.global_batch_size
        logits = _probe_logits(bundle, source, cfg.training.seq_length)
        second = trainer.train_step(source.microbatches(trainer.state.consumed_samples))
        return {"logits": logits, "loss2": second["loss"]}
    finally:
        shutdown()


def save_and_die_during_second_save(rank, world_size, run_dir, ckpt_root):
    """Save step 1 cleanly, then get killed half-way through the step-2 save."""
    cfg, source, bundle, trainer = _setup([], run_dir, 2)
    trainer.train_step(source.microbatches(0))
    trainer.state.step = 1
    trainer.save(ckpt_root)
    trainer.train_step(source.microbatches(8))
    trainer.state.step = 2
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def dying_save(sd, path, **kw):
        real_save(sd, path, **kw)  # shards written, but the rename / `latest` never happens
        os._exit(3)

    dist_checkpointing.save = dying_save
    trainer.save(ckpt_root)
    return "unreachable"
