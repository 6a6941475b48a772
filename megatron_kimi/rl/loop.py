"""The Kimi k1.5 RL loop: online mirror descent with verifiable rewards (reads like the algorithm).

Iteration i (the current policy π_θi is the reference):
  1. take ``prompts_per_iteration`` prompts; sample k responses each from π_θi (rollout engine);
  2. score them (verifier / sandbox reward, + length penalty after its warm-up, + repeat penalty);
  3. recompute log π_θi(y|x) with the trainer (not the sampler's numbers: a train/rollout numeric
     mismatch cannot bias the loss; the mismatch is logged);
  4. a few optimizer steps on L = mean_j (r_j − r̄ − τ·log π_θ/π_θi)² over mini-batches of the samples
     (optionally after resetting the optimizer state, as the paper does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.rl.batching import pack_samples, reference_logprobs
from megatron_kimi.rl.loss import group_baseline
from megatron_kimi.rl.rewards import RewardInput, call_reward, get_reward
from megatron_kimi.rl.shaping import length_penalty, length_penalty_active
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample


@dataclass
class RLContext:
    """Everything the loop talks to; built by commands/rl.py."""

    cfg: object  # RLConfig
    trainer: object  # megatron_kimi.training.trainer.Trainer with the RL forward step
    rollout: Callable[[int, List[Prompt], bool], List[Sample]]  # (iteration, prompts, greedy) -> samples
    pad_id: int


def score(samples: Sequence[Sample], reward_override: str | None, timeout_s: float = 300.0) -> Dict[str, int]:
    """Task reward per sample (grouped by reward kind, one batched call each, within ``timeout_s``).

    A reward that raises or hangs scores its samples 0; returns how many (``reward_errors``,
    ``reward_timeouts``). An unknown reward name is still an error (a config mistake)."""
    by_kind: Dict[str, List[int]] = {}
    for i, s in enumerate(samples):
        by_kind.setdefault(reward_override or s.prompt.kind, []).append(i)
    counts = {"reward_errors": 0, "reward_timeouts": 0}
    for kind, idx in by_kind.items():
        fn = get_reward(kind)
        outs, errors, timeouts = call_reward(
            fn, [RewardInput(prompt=samples[i].prompt.prompt, response=samples[i].response,
                             answer=samples[i].prompt.answer, kind=kind, tests=samples[i].prompt.tests,
                             metadata=samples[i].prompt.metadata) for i in idx], timeout_s, kind)
        counts["reward_errors"] += errors
        counts["reward_timeouts"] += timeouts
        for i, o in zip(idx, outs):
            samples[i].correct = bool(o.correct)
            samples[i].reward_parts = {"task": float(o.score)}
    return counts


def shape_rewards(batch: RolloutBatch, cfg) -> None:
    """Length penalty (§2.3.3, after its warm-up) and repeat penalty; sets ``Sample.reward``."""
    r = cfg.rl
    use_len = r.length_penalty_weight > 0 and length_penalty_active(batch.iteration, r.length_penalty_warmup)
    for group in batch.groups().values():
        if use_len:
            pen = length_penalty([s.response_length for s in group], [s.correct for s in group],
                                 r.length_penalty_weight)
            for s, p in zip(group, pen):
                s.reward_parts["length"] = float(p)
        for s in group:
            if s.finish_reason == "repeat":
                s.reward_parts["repeat"] = float(r.repeat_penalty)
            s.reward = float(sum(s.reward_parts.values()))


def _broadcast_scores(samples: List[Sample], counts: Dict[str, int]) -> Dict[str, int]:
    payload = [[(s.reward, s.correct, s.reward_parts) for s in samples], counts] if dist.get_rank() == 0 \
        else [None, None]
    dist.broadcast_object_list(payload, src=0)
    for s, (rew, ok, parts) in zip(samples, payload[0]):
        s.reward, s.correct, s.reward_parts = rew, ok, parts
    return payload[1]


def rl_iteration(ctx: RLContext, iteration: int, prompts: List[Prompt]) -> Dict[str, float]:
    cfg, trainer = ctx.cfg, ctx.trainer
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    t0 = time.perf_counter()

    # 1. Rollout: k samples per prompt from the current policy.
    samples = ctx.rollout(iteration, prompts, False)
    batch = RolloutBatch(iteration=iteration, k=cfg.rl.k, samples=samples)
    t1 = time.perf_counter()

    # 2. Rewards (scored once, on rank 0, then shared).
    counts: Dict[str, int] = {}
    if dist.get_rank() == 0:
        counts = score(samples, cfg.data.reward, cfg.rl.reward_timeout_s)
        shape_rewards(batch, cfg)
    counts = _broadcast_scores(samples, counts)
    t2 = time.perf_counter()

    # 3. Reference log-probs log π_θi(y|x), recomputed by the trainer.
    order = list(range(len(samples)))
    cap = cfg.training.seq_length
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    adv = group_baseline(rewards, torch.tensor([s.prompt_index for s in samples]))
    ref, ref_tokens = reference_logprobs(trainer.b.model, pack_samples(samples, order, cap, ctx.pad_id, dp_rank, dp,
                                                                       adv), samples, cap)
    for s, lp, tok in zip(samples, ref.tolist(), ref_tokens):
        s.ref_logp, s.ref_token_logp = lp, tok
    t3 = time.perf_counter()

    # 4. A few optimizer steps on the mirror-descent loss over mini-batches of the samples.
    if cfg.rl.reset_optimizer:
        reset_optimizer_state(trainer.b.optimizer)
    rng = np.random.default_rng(cfg.training.seed * 1_000_003 + iteration)
    perm = rng.permutation(len(samples)).tolist()
    minibatches = np.array_split(np.array(perm), cfg.rl.updates_per_iteration)
    steps = []
    for mb in minibatches:
        steps.append(trainer.train_step(pack_samples(samples, mb.tolist(), cap, ctx.pad_id, dp_rank, dp, adv)))
        trainer.state.step += 1
    t4 = time.perf_counter()
    metrics = iteration_metrics(batch, steps, {"rollout": t1 - t0, "scoring": t2 - t1, "reference": t3 - t2,
                                               "train": t4 - t3})
    metrics.update(counts)
    return metrics


def reset_optimizer_state(optimizer) -> None:
    """Zero Adam's moments and step counters (the paper resets the optimizer every iteration)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()


def iteration_metrics(batch: RolloutBatch, steps: List[dict], times: Dict[str, float]) -> Dict[str, float]:
    s = batch.samples
    lengths = np.array([x.response_length for x in s], dtype=float)
    mismatch = [abs(sum(x.sampler_logprobs) - x.ref_logp) / max(x.response_length, 1) for x in s]
    entropies = [x.entropy for x in s if x.entropy is not None]
    gen_tokens = float(lengths.sum())
    out = {
        "reward": float(np.mean([x.reward for x in s])),
        "task_reward": float(np.mean([x.reward_parts.get("task", 0.0) for x in s])),
        "accuracy": float(np.mean([x.correct for x in s])),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncation_rate": float(np.mean([x.finish_reason == "length" for x in s])),
        "repeat_rate": float(np.mean([x.finish_reason == "repeat" for x in s])),
        "logprob_mismatch": float(np.mean(mismatch)),
        "loss": float(np.mean([st["loss"] for st in steps])),
        "grad_norm": float(np.mean([st["grad_norm"] for st in steps])),
        "lr": float(steps[-1]["lr"]),
        "nan_skipped_steps": int(sum(st.get("nan_skipped", 0) for st in steps)),
        "rollout_tokens_per_s": gen_tokens / max(times["rollout"], 1e-9),
        **{f"time_{k}_s": v for k, v in times.items()},
    }
    if entropies:
        out["entropy"] = float(np.mean(entropies))
    # KL proxy: mean over samples of log π_θ/π_θi during the updates (report = [loss, n, Σ log-ratio]).
    out["log_ratio"] = float(np.mean([st["report"][2] / max(st["report"][1], 1.0) for st in steps]))
    return out


def evaluate(ctx: RLContext, prompts: List[Prompt]) -> Dict[str, float]:
    """Greedy held-out accuracy and mean response length."""
    samples = ctx.rollout(-1, prompts, True)
    if dist.get_rank() == 0:
        score(samples, ctx.cfg.data.reward, ctx.cfg.rl.reward_timeout_s)
    payload = [[(s.correct,) for s in samples]] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(payload, src=0)
    correct = [c for (c,) in payload[0]]
    return {"accuracy": float(np.mean(correct)),
            "response_length": float(np.mean([x.response_length for x in samples]))}
