"""Rank bodies for the layout-equivalence tests (module-level so that spawn can import them)."""

from __future__ import annotations

import time

import torch

# A tiny Llama-style model: GQA (4 heads, 2 KV groups), 4 layers (PP=2 x VPP=2 possible).
BASE = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.max_position_embeddings=64",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.seq_length=32",
    "training.seed=7",
    "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-3",
    "optimizer.decay_style=constant",
    "data.builtin_num_lines=600",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


def _records(shards, tensors):
    return [(sh.name, sh.full_shape, sh.index, t.detach().double().clone()) for sh, t in zip(shards, tensors)]


def grads_as_shards(model):
    """Full-model view of the main grads: swap each param's data for its main_grad, read shards."""
    from megatron_kimi.model.sharding import local_shards

    params = [p for chunk in model for p in chunk.parameters()]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.view_as(p.data).to(p.data.dtype)
        shards = local_shards(model)
        return _records(shards, [sh.tensor for sh in shards])
    finally:
        for p, d in zip(params, saved):
            p.data = d


def setup_layout(overrides, run_dir, steps):
    """Init this rank at the layout given by ``overrides``; returns (cfg, source, bundle, trainer)."""
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


def train_layout(rank, world_size, overrides, steps, run_dir, want_grads=True):
    """Train ``steps`` steps at the layout given by ``overrides``; report losses, grads, params."""
    from megatron_kimi.model.sharding import local_shards
    from megatron_kimi.training.runtime import shutdown

    cfg, source, bundle, trainer = setup_layout(overrides, run_dir, steps)
    t = cfg.training
    try:
        records, grads = [], None
        for step in range(steps):
            t0 = time.perf_counter()
            rec = trainer.train_step(source.microbatches(step * t.global_batch_size))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            records.append(dict(rec, step_time_s=time.perf_counter() - t0))
            if step == 0 and want_grads:
                grads = grads_as_shards(bundle.model)
        shards = local_shards(bundle.model)
        params = _records(shards, [sh.tensor for sh in shards])
        return {"records": records, "grads": grads, "params": params}
    finally:
        shutdown()
