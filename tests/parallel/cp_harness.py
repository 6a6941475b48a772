"""Rank body for the context-parallel tests: packed THD micro-batches through the real trainer."""

from __future__ import annotations

import numpy as np

from tests.parallel.harness import BASE, grads_as_shards

# Packs of uneven samples; 1 and 3 are shorter than 2*CP=4 (padded to 4), 17/9/30 are odd.
SAMPLE_LENGTHS = [[1, 3, 17, 20], [30, 9, 2], [5, 40], [13, 11, 7, 3, 6]]
CAPACITY = 64
PAD_MULTIPLE = 4  # 2 * CP for CP=2 (the CP=1 reference gets the same packs)


class _Samples:
    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.data = []
        for n in lengths:
            ids = rng.integers(3, 100, size=n).astype(np.int64)
            mask = (rng.random(n) < 0.7).astype(np.int64)
            mask[0] = 1
            self.data.append((ids, mask))

    def sample(self, i):
        return self.data[i]


def packs():
    from megatron_kimi.data.packing import build_pack
    from megatron_kimi.data.sft_source import to_thd_batch

    flat = [n for pack in SAMPLE_LENGTHS for n in pack]
    samples = _Samples(flat)
    out, k = [], 0
    for pack in SAMPLE_LENGTHS:
        out.append(to_thd_batch(build_pack(samples, list(range(k, k + len(pack))), CAPACITY, pad_id=0,
                                           pad_to_multiple=PAD_MULTIPLE)))
        k += len(pack)
    return out


def cp_train(rank, world_size, overrides, steps):
    """Two packs per step (micro-batches of 1 pack); returns losses, grad norms, step-1 grads."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron.core import parallel_state

    from megatron_kimi.config import load_config
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    cfg = load_config(None, BASE + ["training.global_batch_size=2", "training.micro_batch_size=1",
                                    f"training.seq_length={CAPACITY}", "run_dir=/tmp/unused"] + list(overrides))
    initialize(cfg)
    try:
        bundle = build_training_bundle(cfg, 100, steps)
        trainer = Trainer(bundle, lm_forward_step, CAPACITY, 1)
        batches = packs()
        records, grads = [], None
        for step in range(steps):
            mbs = [batches[(2 * step) % len(batches)], batches[(2 * step + 1) % len(batches)]]
            dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            mbs = mbs[dp_rank::dp]  # each data-parallel rank its own packs of the global batch
            rec = trainer.train_step(mbs)
            rec.pop("report")
            records.append(rec)
            if step == 0:
                grads = grads_as_shards(bundle.model)
        return {"records": records, "grads": grads}
    finally:
        shutdown()
