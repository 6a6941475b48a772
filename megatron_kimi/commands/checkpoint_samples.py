"""Shared by ``megatron-kimi difficulty``, ``sample`` and ``eval``: load a checkpoint into the RL run's
model, generate n samples per prompt with the built-in engine, score them with the RL rewards.

:func:`checkpoint_sampler` sets it up once (process groups, tokenizer, the Megatron model built as ``rl``
builds it, the engine on it, :class:`SampleGenerator` at the given temperature) and tears it down;
:meth:`CheckpointSampler.load` puts a checkpoint's weights in the model (``eval`` loads several in turn);
:meth:`CheckpointSampler.scored` generates (the prompts split over the data-parallel ranks, per-request
seeds, ``batch_prompts`` prompts at a time) and scores on rank 0 (``data.reward`` or each prompt's kind).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from megatron_kimi.config import RLConfig


def check_not_input(cfg: RLConfig, out: Path, key: str) -> None:
    """``out`` (the value of config key ``key``) must not be ``data.prompts`` (never overwritten)."""
    from megatron_kimi.rl.data import BUILTIN
    from megatron_kimi.rl.images import BUILTIN_IMAGE_PROMPTS

    if cfg.data.prompts in (BUILTIN, BUILTIN_IMAGE_PROMPTS):
        return
    src = Path(cfg.data.prompts)
    if not src.is_file():
        raise ValueError(f"data.prompts: prompts file {src} does not exist")
    if out.resolve() == src.resolve() or (out.exists() and out.samefile(src)):
        raise ValueError(f"{key}={str(out)!r} is data.prompts: the input is never overwritten; choose another {key}")


def start_checkpoint(cfg: RLConfig, what: str) -> Path:
    """The run's own latest checkpoint, else ``checkpoint.load``; none is an error (``what``: e.g.
    "to measure": a random init's samples say nothing)."""
    from megatron_kimi.training.checkpoint import start_point

    start, _ = start_point(cfg.run_dir, cfg.checkpoint.resume, cfg.checkpoint.load)
    if start is None:
        raise ValueError(f"no checkpoint {what} (nothing in {Path(cfg.run_dir) / 'checkpoints'} and "
                         "no checkpoint.load); set checkpoint.load=CKPT, e.g. the SFT checkpoint "
                         "(the pass rates of a random init say nothing)")
    return start


class CheckpointSampler:
    def __init__(self, cfg: RLConfig, ctx, bundle, engine, generator, label: str):
        self.cfg, self.ctx, self.bundle, self.engine, self.generator, self.label = \
            cfg, ctx, bundle, engine, generator, label

    @property
    def is_rank0(self) -> bool:
        return self.ctx.is_rank0

    def load(self, checkpoint: Path) -> None:
        """The checkpoint's weights (only) into the model the engine generates with."""
        from megatron_kimi.training import checkpoint as ckpt

        ckpt.load(checkpoint, self.bundle.model)
        self.engine.update_weights(self.bundle.model)

    def scored(self, prompts: list, samples: int, batch_prompts: int) -> Optional[List[List]]:
        """``samples`` samples of each prompt (collective). On rank 0: per prompt, its scored samples
        (``Sample.correct``, ``Sample.response_length``), in sample order; None on the other ranks."""
        import torch.distributed as dist

        from megatron_kimi.rl.loop import score

        groups: Optional[List[List]] = [[] for _ in prompts] if self.is_rank0 else None
        for chunk, lo in enumerate(range(0, len(prompts), batch_prompts)):
            part = prompts[lo: lo + batch_prompts]
            # "iteration" = the chunk: every (prompt, sample) has its own request seed.
            batch = self.generator.sample(self.engine, chunk, part, samples)
            if self.is_rank0:
                score(batch.samples, self.cfg.data.reward, self.cfg.rl.reward_timeout_s)
                for s in batch.samples:
                    groups[lo + s.prompt_index].append(s)
                if len(prompts) > batch_prompts:
                    print(f"{self.label}: {min(lo + batch_prompts, len(prompts))}/{len(prompts)} prompts", flush=True)
        dist.barrier()
        return groups


@contextmanager
def checkpoint_sampler(cfg: RLConfig, temperature: float, label: str) -> Iterator[CheckpointSampler]:
    """Process groups, tokenizer, model, engine and generator for the body; shut down after it. No
    weights are loaded: call :meth:`CheckpointSampler.load`."""
    import torch.distributed as dist

    from megatron_kimi.commands.rl import prompt_images, stop_token_ids
    from megatron_kimi.data.tokenizer import load_tokenizer
    from megatron_kimi.model.sharding import unwrap
    from megatron_kimi.rl.generation import SampleGenerator
    from megatron_kimi.rollout.engine import GenerationEngine
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown

    ctx = initialize(cfg)
    try:
        cache = Path(cfg.run_dir) / "cache"
        if ctx.is_rank0:
            load_tokenizer(cfg.data.tokenizer, cache)
        dist.barrier()
        tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
        images = prompt_images(cfg, tokenizer)
        # Built as `rl` builds it (same modules, layout and checkpoint keys); only the weights are loaded.
        bundle = build_training_bundle(cfg, len(tokenizer), total_steps=1)
        engine = GenerationEngine(unwrap(bundle.model[0]), max_batch_size=cfg.rollout.max_batch_size,
                                  max_seq_len=cfg.training.seq_length, eos_token_id=tokenizer.eos_token_id)
        rollout = dataclasses.replace(cfg.rollout, temperature=temperature)
        generator = SampleGenerator(tokenizer, rollout, stop_token_ids(tokenizer), images)
        engine.resume()
        yield CheckpointSampler(cfg, ctx, bundle, engine, generator, label)
        engine.close()
    finally:
        shutdown()
