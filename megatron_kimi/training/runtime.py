"""Process-level setup: distributed init, Megatron parallel state, seeds; and model/optimizer build."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_kimi.config import RLConfig, TrainConfig, validate_layout
from megatron_kimi.model.builder import (
    apply_freezing,
    build_model_chunks,
    padded_vocab_size,
    transformer_config,
    wrap_for_training,
)
from megatron_kimi.model.init import init_weights
from megatron_kimi.platform.launch import DistEnv, detect_env, init_process_group
from megatron_kimi.training.optim import build_optimizer, build_scheduler


@dataclass
class DistContext:
    env: DistEnv
    backend: str
    dp_size: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0


def initialize(cfg: TrainConfig) -> DistContext:
    """Init torch.distributed (gloo on CPU with the CUDA emulation, NCCL on GPU) and Megatron."""
    env = detect_env()
    dp = validate_layout(cfg, env.world_size)  # before any collective: a bad layout fails fast
    backend = init_process_group(env, timeout_s=cfg.parallel.timeout_s)
    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline,
            context_parallel_size=p.context,
        )
    seed_everything(cfg.training.seed)
    return DistContext(env=env, backend=backend, dp_size=dp)


def seed_everything(seed: int) -> None:
    """Megatron-LM's scheme: offset by PP rank; TP ranks share the default stream (tracker forks)."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class ModelBundle:
    """What the trainer drives: DDP-wrapped model chunks, optimizer, LR schedule, Megatron config."""

    model: List
    optimizer: object
    scheduler: object
    config: object
    vocab_size: int  # padded


def lm_head_impl(cfg) -> str:
    """How the per-token loss is computed: ``rl.logprob_impl`` for RL, else ``training.lm_loss_impl``."""
    return cfg.rl.logprob_impl if isinstance(cfg, RLConfig) else cfg.training.lm_loss_impl


def build_training_bundle(cfg: TrainConfig, vocab_size: int, total_steps: int) -> ModelBundle:
    m = cfg.model
    tf_config = transformer_config(m, cfg.parallel, cfg.precision, cfg.recompute)
    padded = padded_vocab_size(m.vocab_size or vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tensor)
    chunks = build_model_chunks(m, tf_config, padded, lm_head_impl(cfg))
    init_weights(chunks, seed=cfg.training.seed, std=m.init_method_std, num_layers=m.num_layers)
    if m.vision is not None:  # before DDP: frozen parameters get no grad buffer and no optimizer state
        apply_freezing(chunks, m.vision)
    model = wrap_for_training(chunks, tf_config, cfg.parallel, cfg.precision)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.parallel, cfg.precision)
    scheduler = build_scheduler(optimizer, cfg.optimizer, total_steps)
    tf_config.finalize_model_grads_func = finalize_model_grads
    if cfg.precision.dtype == "fp16":
        tf_config.grad_scale_func = optimizer.scale_loss
    return ModelBundle(model=model, optimizer=optimizer, scheduler=scheduler, config=tf_config, vocab_size=padded)
