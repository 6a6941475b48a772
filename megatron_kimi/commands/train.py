"""``megatron-kimi train CONFIG.yaml``: causal-LM training on a text corpus."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.config import TrainConfig, to_dict
from megatron_kimi.data.corpus import SequenceSampler, TokenCorpus, generate_arithmetic_corpus, load_texts
from megatron_kimi.data.jsonl import BadLines
from megatron_kimi.data.lm_source import LMBatchSource
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.platform import preemption
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.lm_step import lm_forward_step
from megatron_kimi.training.metrics import MetricsWriter, truncate_metrics
from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
from megatron_kimi.training.trainer import Trainer

BUILTIN_ARITHMETIC = "builtin:arithmetic"


def prepare_corpus(cfg: TrainConfig, is_rank0: bool):
    """Tokenizer and token corpus (rank 0 writes shared files first, the others then read them)."""
    cache = Path(cfg.run_dir) / "cache"
    data_path = cfg.data.path
    if data_path == BUILTIN_ARITHMETIC:
        data_path = str(cache / "arithmetic.jsonl")
    if is_rank0:
        load_tokenizer(cfg.data.tokenizer, cache)
        if cfg.data.path == BUILTIN_ARITHMETIC:
            generate_arithmetic_corpus(data_path, cfg.data.builtin_num_lines, seed=cfg.training.seed)
    dist.barrier()
    tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
    bad = BadLines(str(data_path))
    texts = load_texts(data_path, cfg.data.text_key, on_error=cfg.data.on_error, bad=bad)
    if bad.count and is_rank0:
        print(f"train: {bad.summary()}", flush=True)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    corpus = TokenCorpus(docs, tokenizer.eos_token_id, cfg.training.seq_length)
    if len(corpus) == 0:
        raise ValueError(f"{data_path}: too little text for one sample of {cfg.training.seq_length + 1} tokens")
    return tokenizer, corpus


def run(cfg: TrainConfig) -> int:
    if cfg.parallel.context > 1:
        raise ValueError("parallel.context > 1: context parallelism runs on packed (THD) batches; use "
                         "`megatron-kimi sft` (the train command feeds fixed-length sbhd samples)")
    ctx = initialize(cfg)
    try:
        tokenizer, corpus = prepare_corpus(cfg, ctx.is_rank0)
        t = cfg.training
        source = LMBatchSource(
            corpus=corpus,
            sampler=SequenceSampler(len(corpus), seed=t.seed),
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=ctx.dp_size,
        )
        bundle = build_training_bundle(cfg, len(tokenizer), t.steps)
        run_dir = Path(cfg.run_dir)
        trainer = Trainer(bundle, lm_forward_step, t.seq_length, t.micro_batch_size,
                          max_consecutive_nan_steps=t.max_consecutive_nan_steps)
        start, _ = ckpt.start_point(cfg.run_dir, cfg.checkpoint.resume, cfg.checkpoint.load)
        if start is not None:
            trainer.load(start, load_optimizer=cfg.checkpoint.load_optimizer)
        if ctx.is_rank0:  # a resumed run rewrites what followed its checkpoint; a fresh one starts over
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
        first = trainer.state.step
        writer = MetricsWriter(run_dir, enabled=ctx.is_rank0, tensorboard=cfg.logging.tensorboard,
                               progress_bar=cfg.logging.progress_bar, log_interval=cfg.logging.log_interval, progress_total=t.steps, progress_initial=first)
        if start is not None:
            writer.print(f"resumed from {start} at step {first}")
        writer.print(
            f"train: {corpus.stream.size} tokens, {len(corpus)} samples of {t.seq_length}; "
            f"world {ctx.env.world_size} = tp {cfg.parallel.tensor} x pp {cfg.parallel.pipeline} x "
            f"cp {cfg.parallel.context} x dp {ctx.dp_size}; backend {ctx.backend}"
        )
        history = trainer.fit(
            source,
            writer,
            total_steps=t.steps,
            ckpt_root=run_dir / "checkpoints",
            save_interval=cfg.checkpoint.save_interval,
            save_at_end=cfg.checkpoint.save_at_end,
            keep_last=cfg.checkpoint.keep_last,
            tokens_per_sample=t.seq_length,
            extra_state={"config": to_dict(cfg)},
            should_stop=preemption.requested,
        )
        writer.close()
        if history and ctx.is_rank0:
            print(f"train: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} over steps "
                  f"{first + 1}..{trainer.state.step}; run dir {run_dir}", flush=True)
        return preemption.EXIT_PREEMPTED if trainer.stopped else 0
    finally:
        shutdown()
