"""``megatron-kimi rl CONFIG.yaml``: online mirror-descent RL (the loop is megatron_kimi/rl/loop.py).

Wires the loop's parts: the trainer (Megatron model, optimizer, RL forward step), the built-in rollout
engine on the same weights, the prompts; then the summary and a PNG plot of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from megatron_kimi.commands.common import Job, Run, run_job
from megatron_kimi.config import RLConfig
from megatron_kimi.data.images import ImageProcessing
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.model.sharding import unwrap
from megatron_kimi.rl import loop
from megatron_kimi.rl.batching import make_rl_forward_step
from megatron_kimi.rl.data import load_prompt_sets
from megatron_kimi.rl.generation import SampleGenerator
from megatron_kimi.rl.images import PromptImages, check_image_rl
from megatron_kimi.rl.loss import get_loss
from megatron_kimi.rl.plot import plot_curves
from megatron_kimi.rollout.engine import GenerationEngine
from megatron_kimi.training.runtime import DistContext, build_training_bundle
from megatron_kimi.training.trainer import Trainer


def run(cfg: RLConfig) -> int:
    return run_job(cfg, lambda ctx, start: build_job(cfg, ctx))


def stop_token_ids(tokenizer) -> List[int]:
    """EOS, and the chat format's end-of-turn token where the tokenizer has one."""
    end = {tokenizer.convert_tokens_to_ids("<|end|>")} if "<|end|>" in tokenizer.get_vocab() else set()
    return sorted({tokenizer.eos_token_id} | end)


def prompt_images(cfg: RLConfig, tokenizer) -> Optional[PromptImages]:
    """A VLM's image-prompt encoder (adds the placeholder token to ``tokenizer``); None without
    ``model.vision``. Call it before sizing the model's vocab from the tokenizer."""
    if cfg.model.vision is None:
        return None
    check_image_rl(cfg)
    v = cfg.model.vision
    return PromptImages(tokenizer, cfg.data.image_token,
                        ImageProcessing(patch_size=v.patch_size, merge_kernel_size=v.merge_kernel_size))


def build_rl_job(cfg: RLConfig, ctx: DistContext) -> loop.RLJob:
    """The loop's parts: the trainer, the built-in rollout engine on its weights, the prompts."""
    cache = Path(cfg.run_dir) / "cache"
    if ctx.is_rank0:
        load_tokenizer(cfg.data.tokenizer, cache)
    dist.barrier()
    tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
    images = prompt_images(cfg, tokenizer)  # before the model: the placeholder token may grow the vocab
    train_prompts, heldout = load_prompt_sets(cfg)
    get_loss(cfg.rl.loss)  # fail fast on a bad name
    r = cfg.rl
    bundle = build_training_bundle(cfg, len(tokenizer), total_steps=max(1, r.iterations * r.updates_per_iteration))
    trainer = Trainer(bundle, make_rl_forward_step(r.loss, r.tau, r.logprob_impl), cfg.training.seq_length,
                      micro_batch_size=1, loss_key="rl",
                      max_consecutive_nan_steps=cfg.training.max_consecutive_nan_steps)
    if cfg.rollout.engine == "vllm":
        from megatron_kimi.rollout.vllm_backend import VllmBackend  # raises ValueError without vllm

        engine = VllmBackend(trainer.model, cfg.model, max_seq_len=cfg.training.seq_length,
                             max_batch_size=cfg.rollout.max_batch_size, eos_token_id=tokenizer.eos_token_id,
                             seed=cfg.rollout.seed, sync_bucket_mb=cfg.rollout.sync_bucket_mb,
                             sleep_level=cfg.rollout.sleep_level,
                             gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                             enforce_eager=cfg.rollout.enforce_eager)
    elif cfg.rollout.engine == "vllm_server":
        from megatron_kimi.rollout.server_backend import VllmServerBackend

        ro = cfg.rollout
        engine = VllmServerBackend(trainer.model, cfg.model, max_seq_len=cfg.training.seq_length,
                                   max_batch_size=ro.max_batch_size, eos_token_id=tokenizer.eos_token_id,
                                   seed=ro.seed, sync_bucket_mb=ro.sync_bucket_mb, url=ro.server_url,
                                   weights_dir=ro.server_weights_dir or None, request_timeout_s=ro.request_timeout_s,
                                   request_retries=ro.request_retries, start_timeout_s=ro.server_start_timeout_s,
                                   log_dir=cfg.run_dir, sleep_level=ro.sleep_level,
                                   gpu_memory_utilization=ro.gpu_memory_utilization, enforce_eager=ro.enforce_eager)
    else:
        engine = GenerationEngine(unwrap(trainer.model[0]), max_batch_size=cfg.rollout.max_batch_size,
                                  max_seq_len=cfg.training.seq_length, eos_token_id=tokenizer.eos_token_id)
    return loop.RLJob(cfg=cfg, trainer=trainer, backend=engine,
                      generator=SampleGenerator(tokenizer, cfg.rollout, stop_token_ids(tokenizer), images),
                      train_prompts=train_prompts, heldout_prompts=heldout, pad_id=tokenizer.pad_token_id)


def build_job(cfg: RLConfig, ctx: DistContext) -> Job:
    job = build_rl_job(cfg, ctx)
    result: dict = {}

    def fit(run: Run) -> None:
        result["summary"], result["history"] = loop.train(job, run.writer, run.checkpointer, run.run_dir,
                                                          run.start if run.resumed else None)

    def summary(run: Run) -> None:
        if run.checkpointer.stopped:  # summary.json was written with the stop checkpoint
            return
        s, history = result["summary"], result["history"]
        loop.write_atomic(run.run_dir / "summary.json", json.dumps(s, indent=1))
        if history:
            plot_curves(history, run.run_dir / "rl_curves.png", s["before"])
        b, a = s["before"], s["after"]
        print(f"rl: held-out accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, mean response length "
              f"{b['response_length']:.2f} -> {a['response_length']:.2f}; run dir {run.run_dir}", flush=True)

    return Job(job.trainer, total=cfg.rl.iterations, fit=fit, summary=summary, unit="iteration",
               weights_only_warm_start=True)
