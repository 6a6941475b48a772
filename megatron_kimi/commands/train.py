"""``megatron-kimi train CONFIG.yaml``: causal-LM training on a text corpus."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.commands.common import Job, Run, run_job
from megatron_kimi.config import TrainConfig
from megatron_kimi.data.corpus import SequenceSampler, TokenCorpus, generate_arithmetic_corpus, load_texts
from megatron_kimi.data.jsonl import BadLines
from megatron_kimi.data.lm_source import LMBatchSource
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.training.lm_step import lm_forward_step
from megatron_kimi.training.runtime import DistContext, build_training_bundle
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
    return run_job(cfg, lambda ctx, start: build_job(cfg, ctx))


def build_job(cfg: TrainConfig, ctx: DistContext) -> Job:
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
    trainer = Trainer(bundle, lm_forward_step, t.seq_length, t.micro_batch_size,
                      max_consecutive_nan_steps=t.max_consecutive_nan_steps)
    history: list = []

    def fit(run: Run) -> None:
        run.writer.print(
            f"train: {corpus.stream.size} tokens, {len(corpus)} samples of {t.seq_length}; "
            f"world {ctx.env.world_size} = tp {cfg.parallel.tensor} x pp {cfg.parallel.pipeline} x "
            f"cp {cfg.parallel.context} x dp {ctx.dp_size}; backend {ctx.backend}"
        )
        history.extend(trainer.fit(source, run.writer, t.steps, run.checkpointer, tokens_per_sample=t.seq_length))

    def summary(run: Run) -> None:
        if history:
            print(f"train: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} over steps "
                  f"{history[0]['step']}..{trainer.state.step}; run dir {run.run_dir}", flush=True)

    return Job(trainer, total=t.steps, fit=fit, summary=summary)
