"""Rank bodies for checkpoint tests (module-level for spawn)."""

from __future__ import annotations

import os

from tests.parallel.harness import setup_layout


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

    cfg, source, bundle, trainer = setup_layout(overrides, run_dir, 2)
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

    cfg, source, bundle, trainer = setup_layout(overrides, run_dir, 2)
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
    cfg, source, bundle, trainer = setup_layout([], run_dir, 2)
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
