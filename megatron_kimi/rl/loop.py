"""The Kimi k1.5 RL loop: online mirror descent with verifiable rewards (reads like the algorithm).

Iteration i (the current policy π_θi is the reference):
  1. prompts ← ``rl.prompts_per_iteration`` of the training prompts (``data.sampling``: uniform,
     curriculum or prioritized by success rate; rl/prompt_sampler.py);
  2. samples ← k responses per prompt from π_θi (the rollout backend), then the backend releases its
     memory for training. With partial rollouts (``rollout.partial_budget``, rl/partial.py) each
     trajectory gets one bounded segment per iteration, unfinished ones wait in the replay buffer, and
     only groups whose k responses are all finished go on;
  3. rewards ← verifier / sandbox score + length penalty (after its warm-up) + repeat penalty (with
     ``rl.async_scoring`` the task reward of a sample starts as soon as it is generated, in a thread pool
     while the rest are generating: rl/scoring.py; the loop waits only for what still runs);
  4. advantage ← r − r̄ (r̄: the mean reward of the prompt's k samples);
  5. log π_θi(y|x) ← the trainer (not the sampler's numbers: a train/rollout numeric mismatch cannot
     bias the loss; the mismatch is logged);
  6. ``rl.updates_per_iteration`` optimizer steps on L = mean_j (r_j − r̄ − τ·log π_θ/π_θi)² over
     mini-batches of the samples (optionally after resetting the optimizer state, as the paper does);
  7. the backend resumes and takes the new weights (:func:`to_rollout`: with the optimizer state moved
     to CPU, the engine's weights woken, synced, then its KV cache); held-out evaluation and checkpoint
     when due (the prompt sampler's statistics and the replay buffer are in the checkpoint).

The rollout backend's lifecycle is in :mod:`megatron_kimi.rollout.backend`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.config import RLConfig
from megatron_kimi.rl.batching import pack_samples, reference_logprobs
from megatron_kimi.rl.generation import SampleGenerator
from megatron_kimi.rl.loss import group_baseline
from megatron_kimi.rl.partial import ReplayBuffer
from megatron_kimi.rl.prompt_sampler import PromptSampler
from megatron_kimi.rl.scoring import AsyncScorer, score  # score: also loop.score for its callers
from megatron_kimi.rl.shaping import length_penalty, length_penalty_active
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample
from megatron_kimi.rollout.backend import KV_CACHE, WEIGHTS, RolloutBackend
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.checkpointer import Checkpointer
from megatron_kimi.training.metrics import MetricsWriter
from megatron_kimi.training.trainer import Trainer


@dataclass
class RLJob:
    """Everything the loop talks to; built by commands/rl.py."""

    cfg: RLConfig
    trainer: Trainer  # with the RL forward step
    backend: RolloutBackend
    generator: SampleGenerator  # prompts -> requests -> (backend) -> samples
    train_prompts: List[Prompt]
    heldout_prompts: List[Prompt]
    pad_id: int


def train(job: RLJob, writer: MetricsWriter, checkpointer: Checkpointer, run_dir: Path,
          resumed_from: Optional[Path]) -> Tuple[dict, List[dict]]:
    """Iterations from the trainer's count to ``rl.iterations`` (or a preemption stop: then
    ``checkpointer.stopped``). ``resumed_from``: the run's own checkpoint it resumes (None: a new run).
    Returns the summary (held-out accuracy ``before`` / ``after``) and the per-iteration records of
    the whole run."""
    cfg, r, trainer, backend = job.cfg, job.cfg.rl, job.trainer, job.backend
    summary_path = run_dir / "summary.json"
    # A resumed run keeps the evaluation before RL and the curves up to its checkpoint.
    summary = json.loads(summary_path.read_text()) if (resumed_from and summary_path.is_file()) else {}
    history = read_history(run_dir / "metrics.jsonl") if resumed_from else []
    sampler, buffer = make_sampler(cfg, job.train_prompts), make_buffer(cfg)
    scorer = make_scorer(cfg)
    if resumed_from is not None:
        load_rl_state(ckpt.read_common(resumed_from).get("rl_state"), sampler, buffer)

    to_rollout(job, _Laps())
    if "before" not in summary:
        summary["before"] = evaluate(job, scorer)
    writer.print(f"rl: {len(job.train_prompts)} prompts, {len(job.heldout_prompts)} held-out; k={r.k}, "
                 f"tau={r.tau}; held-out accuracy before {summary['before']['accuracy']:.3f}")
    for it in range(trainer.state.iteration, r.iterations):
        last = it + 1 == r.iterations
        times = _Laps()
        picks = sampler.sample(r.prompts_per_iteration, it)
        if buffer is None:
            batch = job.generator.sample(backend, it, [job.train_prompts[i] for i in picks], r.k, scorer)
            for s in batch.samples:
                s.dataset_index = picks[s.prompt_index]
        else:
            batch = job.generator.sample_partial(backend, it, buffer, picks, job.train_prompts)
        times.lap("rollout")
        if batch.reward_counts is not None:  # generation ended waiting for the rewards still running
            times["rollout"] -= scorer.last_wait_s
            times["scoring_wait"] = scorer.last_wait_s
        to_training(job, times)
        record = {"iteration": it + 1, "step": it + 1}
        if batch.samples:  # partial rollouts: an iteration may complete no group yet
            counts = assign_rewards(batch, cfg)
            sampler.update([s.dataset_index for s in batch.samples], [float(s.correct) for s in batch.samples])
            times.lap("scoring")
            adv_N = group_baseline(torch.tensor([s.reward for s in batch.samples], dtype=torch.float64),
                                   torch.tensor([s.prompt_index for s in batch.samples]))
            set_reference_logprobs(trainer, batch.samples, adv_N, cfg.training.seq_length, job.pad_id)
            times.lap("reference")
            steps = update_policy(trainer, batch.samples, adv_N, cfg, it, job.pad_id)
            times.lap("train")
            record.update(iteration_metrics(batch, steps, times), **counts)
        trainer.end_iteration()
        to_rollout(job, times)
        record.update(switch_metrics(backend, times))
        if buffer is not None:
            record.update(partial_metrics(batch, buffer, it))
        if last or (r.eval_interval and (it + 1) % r.eval_interval == 0):
            held = evaluate(job, scorer)
            if last:
                summary["after"] = held
            record.update(eval_accuracy=held["accuracy"], eval_response_length=held["response_length"])
        writer.log(record, it + 1)
        history.append(record)
        # summary.json is written with every checkpoint: a resumed run must find its "before".
        def before_save():
            _write_summary(summary_path, summary)
            checkpointer.extra["rl_state"] = rl_state(sampler, buffer)

        if checkpointer.save(it + 1, last_step=last, before_save=before_save):
            writer.print(f"stopping after iteration {it + 1} (preemption requested); checkpoint saved")
            break
    else:
        if "after" not in summary:  # resumed after the last iteration
            summary["after"] = evaluate(job, scorer)
    backend.close()
    if scorer is not None:
        scorer.close()
    if trainer.optimizer_offloaded:
        trainer.reload_optimizer()
    return summary, history


# ---- switching the GPU between rollout and training (colocation) ---------------------------------

def to_rollout(job: RLJob, times: "_Laps") -> None:
    """Training → rollout: the optimizer state to CPU (``rollout.offload_optimizer``), then the engine
    wakes its weights, takes the trainer's, and only then wakes its KV cache (rollout/backend.py).
    Each switch is timed (``time_switch_*_s``)."""
    trainer, backend = job.trainer, job.backend
    if job.cfg.rollout.offload_optimizer:
        trainer.offload_optimizer()
        times.lap("switch_offload_optimizer")
    backend.resume([WEIGHTS])
    times.lap("switch_wake_weights")
    backend.update_weights(trainer.model)
    times.lap("switch_sync_weights")
    backend.resume([KV_CACHE])
    times.lap("switch_wake_kv_cache")


def to_training(job: RLJob, times: "_Laps") -> None:
    """Rollout → training: the engine frees its memory, the optimizer state comes back."""
    job.backend.release()
    times.lap("switch_release")
    if job.trainer.optimizer_offloaded:
        job.trainer.reload_optimizer()
        times.lap("switch_reload_optimizer")


def switch_metrics(backend: RolloutBackend, times: Dict[str, float]) -> Dict[str, float]:
    """The iteration's switches (seconds each), the engine's weight version, and for an engine with its
    own copy of the weights the sync's size and GB/s."""
    out: Dict[str, float] = {f"time_{k}_s": v for k, v in times.items() if k.startswith("switch_")}
    out["weight_version"] = int(backend.weight_version)
    nbytes = getattr(backend, "last_sync_bytes", 0)
    if nbytes:
        out.update(sync_gb=nbytes / 1e9, sync_gbps=nbytes / 1e9 / max(times["switch_sync_weights"], 1e-9))
    return out


# ---- prompt sampling and partial rollouts ------------------------------------------------------

def make_sampler(cfg, train_prompts: Sequence[Prompt]) -> PromptSampler:
    d = cfg.data
    return PromptSampler(train_prompts, d.sampling, cfg.training.seed, d.curriculum_switch_iteration,
                         d.curriculum_easy_fraction, d.priority_floor)


def make_scorer(cfg) -> Optional[AsyncScorer]:
    """``rl.async_scoring``: the pool that scores samples while generation goes on (None: after it)."""
    r = cfg.rl
    return AsyncScorer(cfg.data.reward, r.reward_timeout_s, r.scoring_workers) if r.async_scoring else None


def make_buffer(cfg) -> Optional[ReplayBuffer]:
    ro = cfg.rollout
    if ro.partial_budget <= 0:
        return None
    return ReplayBuffer(cfg.rl.k, ro.partial_budget, ro.max_new_tokens, ro.partial_max_segments)


def rl_state(sampler: PromptSampler, buffer: Optional[ReplayBuffer]) -> dict:
    """What of the loop is not in the trainer's state: saved with every checkpoint."""
    return {"sampler": sampler.state_dict(), "buffer": None if buffer is None else buffer.state_dict()}


def load_rl_state(state: Optional[dict], sampler: PromptSampler, buffer: Optional[ReplayBuffer]) -> None:
    if state is None:  # a checkpoint from before the sampler had state: start its statistics afresh
        return
    sampler.load_state_dict(state["sampler"])
    if buffer is not None and state.get("buffer") is not None:
        buffer.load_state_dict(state["buffer"])
    elif buffer is not None or state.get("buffer") is not None:
        raise ValueError("rollout.partial_budget must match the resumed checkpoint's (partial rollouts on in one "
                         "and off in the other: its replay buffer cannot be carried over)")


def partial_metrics(batch: RolloutBatch, buffer: ReplayBuffer, iteration: int) -> Dict[str, float]:
    """Replay-buffer size and how stale the trained samples' tokens were."""
    versions = [v for s in batch.samples for v in (s.weight_versions or [])]
    return {"replay_groups": len(buffer), "replay_trajectories": len(buffer.pending()),
            "completed_groups": len(batch.groups()),
            "stale_token_fraction": float(np.mean([v < iteration for v in versions])) if versions else 0.0}


# ---- the steps ------------------------------------------------------------------------------

def assign_rewards(batch: RolloutBatch, cfg) -> Dict[str, int]:
    """Score (unless already scored during generation: ``batch.reward_counts``) and shape on rank 0,
    then share: sets ``Sample.reward``, ``correct``, ``reward_parts`` on every rank (one rank decides: a
    sandbox timeout cannot differ between ranks). Returns the reward error / timeout counts."""
    counts: Dict[str, int] = {}
    if dist.get_rank() == 0:
        counts = batch.reward_counts
        if counts is None:
            counts = score(batch.samples, cfg.data.reward, cfg.rl.reward_timeout_s)
        shape_rewards(batch, cfg)
    return _broadcast_scores(batch.samples, counts)


def set_reference_logprobs(trainer: Trainer, samples: List[Sample], adv_N: torch.Tensor, seq_length: int,
                           pad_id: int) -> None:
    """``Sample.ref_logp`` / ``ref_token_logp``: log π_θi of each sample, recomputed by the trainer."""
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    packs = pack_samples(samples, list(range(len(samples))), seq_length, pad_id, dp_rank, dp, adv_N)
    ref_N, ref_tokens = reference_logprobs(trainer.model, packs, samples, seq_length)
    for s, lp, tok in zip(samples, ref_N.tolist(), ref_tokens):
        s.ref_logp, s.ref_token_logp = lp, tok


def update_policy(trainer: Trainer, samples: List[Sample], adv_N: torch.Tensor, cfg, iteration: int,
                  pad_id: int) -> List[dict]:
    """``rl.updates_per_iteration`` optimizer steps, over a random split of the samples."""
    if cfg.rl.reset_optimizer:
        trainer.reset_optimizer_state()
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    # As for the prompt pick (rl/data.py): a generator per (seed, iteration), nothing to checkpoint;
    # another prime multiplier, so that for a seed other than 0 the two streams differ.
    rng = np.random.default_rng(cfg.training.seed * 1_000_003 + iteration)
    perm = rng.permutation(len(samples)).tolist()
    return [trainer.step(pack_samples(samples, mb.tolist(), cfg.training.seq_length, pad_id, dp_rank, dp, adv_N))
            for mb in np.array_split(np.array(perm), cfg.rl.updates_per_iteration)]


def evaluate(job: RLJob, scorer: Optional[AsyncScorer] = None) -> Dict[str, float]:
    """Greedy held-out accuracy and mean response length (collective); with a ``scorer``, scored while
    generating."""
    samples = job.generator.greedy(job.backend, job.heldout_prompts, scorer)
    if dist.get_rank() == 0 and scorer is None:
        score(samples, job.cfg.data.reward, job.cfg.rl.reward_timeout_s)
    payload = [[(s.correct,) for s in samples]] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(payload, src=0)
    correct = [c for (c,) in payload[0]]
    return {"accuracy": float(np.mean(correct)),
            "response_length": float(np.mean([x.response_length for x in samples]))}


# ---- rewards --------------------------------------------------------------------------------

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


# ---- records --------------------------------------------------------------------------------

def iteration_metrics(batch: RolloutBatch, steps: List[dict], times: Dict[str, float]) -> Dict[str, float]:
    s = batch.samples
    lengths = np.array([x.response_length for x in s], dtype=float)
    # over the loss tokens (all of the response, or a partial rollout's last segment): what ref_logp covers
    mismatch = [abs(sum(x.sampler_logprobs[x.loss_start:]) - x.ref_logp) / max(x.loss_length, 1) for x in s]
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
        "dropped_requests": int(batch.dropped),  # by the backend after its retries; not in the samples
        "rollout_tokens_per_s": gen_tokens / max(times["rollout"], 1e-9),
        **{f"time_{k}_s": v for k, v in times.items()},
    }
    if entropies:
        out["entropy"] = float(np.mean(entropies))
    # KL proxy: the mean over samples of log π_θ/π_θi during the updates.
    out["log_ratio"] = float(np.mean([st["report"]["log_ratio_sum"] / max(st["report"]["loss_count"], 1.0)
                                      for st in steps]))
    return out


class _Laps(dict):
    """Seconds per phase: ``lap(name)`` records the time since the previous lap (or creation)."""

    def __init__(self):
        super().__init__()
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self[name], self._t = now - self._t, now


def read_history(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_summary(path: Path, summary: dict) -> None:
    if dist.get_rank() == 0:
        write_atomic(path, json.dumps(summary, indent=1))


def write_atomic(path: Path, text: str) -> None:
    """A kill mid-write leaves the old file, not a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
