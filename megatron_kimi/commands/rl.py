"""``megatron-kimi rl CONFIG.yaml``: online mirror-descent RL (the loop is megatron_kimi/rl/loop.py).

Sets up the trainer (Megatron model, optimizer, RL forward step), the built-in rollout engine on the
same weights, the prompts, held-out evaluation, checkpoints, metrics and a PNG plot of the run.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import List

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.config import RLConfig, to_dict
from megatron_kimi.data.jsonl import BadLines
from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.model.sharding import unwrap
from megatron_kimi.platform import preemption
from megatron_kimi.rl.batching import make_rl_forward_step
from megatron_kimi.rl.data import arithmetic_prompts, load_prompts, prompt_token_ids
from megatron_kimi.rl.loop import RLContext, evaluate, rl_iteration
from megatron_kimi.rl.loss import get_loss
from megatron_kimi.rl.shaping import RepeatDetector
from megatron_kimi.rl.types import Prompt, Sample
from megatron_kimi.rollout.engine import GenerationEngine, GenerationRequest, SamplingParams
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.metrics import MetricsWriter, truncate_metrics
from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
from megatron_kimi.training.trainer import Trainer

BUILTIN = "builtin:arithmetic"


def _load_prompts_reporting(path: str, cfg: RLConfig) -> List[Prompt]:
    bad = BadLines(path)
    prompts = load_prompts(path, on_error=cfg.data.on_error, bad=bad, reward=cfg.data.reward)
    if bad.count and dist.get_rank() == 0:
        print(f"rl: {bad.summary()}", flush=True)
    return prompts


def load_prompt_sets(cfg: RLConfig):
    d = cfg.data
    train = (arithmetic_prompts(4000, cfg.training.seed, heldout=False) if d.prompts == BUILTIN
             else _load_prompts_reporting(d.prompts, cfg))
    if d.eval_prompts:
        held = _load_prompts_reporting(d.eval_prompts, cfg)
    elif d.prompts == BUILTIN:
        held = arithmetic_prompts(d.eval_size, cfg.training.seed + 1, heldout=True)
    else:
        held = train[-d.eval_size:]
        train = train[:-d.eval_size] or train
    return train, held[: d.eval_size]


def make_rollout(cfg: RLConfig, engine: GenerationEngine, tokenizer, stop_ids: List[int]):
    """(iteration, prompts, greedy) -> k samples per prompt, identical on every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    ro = cfg.rollout

    def rollout(iteration: int, prompts: List[Prompt], greedy: bool) -> List[Sample]:
        k = 1 if greedy else cfg.rl.k
        ids = [prompt_token_ids(tokenizer, p) for p in prompts]
        mine = [(pi, j) for pi in range(len(prompts)) if pi % dp == dp_rank for j in range(k)]
        reqs = []
        for pi, j in mine:
            params = SamplingParams(
                temperature=0.0 if greedy else ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                max_new_tokens=ro.max_new_tokens, stop_token_ids=tuple(stop_ids),
                seed=zlib.crc32(f"{ro.seed}|{iteration}|{pi}|{j}".encode()),
                repeat_detector_factory=RepeatDetector if ro.repeat_detection else None,
            )
            reqs.append(GenerationRequest(request_id=f"{pi}/{j}", prompt_ids=ids[pi], params=params))
        results = engine.generate(reqs)
        local = []
        for (pi, _j), res in zip(mine, results):
            local.append(Sample(
                prompt_index=pi, prompt=prompts[pi], prompt_ids=ids[pi], response_ids=list(res.output_ids),
                response=tokenizer.decode(res.output_ids, skip_special_tokens=True),
                sampler_logprobs=list(res.logprobs), finish_reason=res.finish_reason,
                entropy=res.mean_entropy,
            ))
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
        samples = [s for part in gathered for s in part]
        samples.sort(key=lambda s: s.prompt_index)  # stable: j order kept within a prompt
        return samples

    return rollout


def _plot(history: List[dict], path: Path, before: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("reward", "accuracy", "response_length_mean"),
                              ("mean reward", "train accuracy (sampled)", "mean response length")):
        ax.plot(its, [h[key] for h in history], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    evals = [{"iteration": 0, "eval_accuracy": before["accuracy"]}] + [h for h in history if "eval_accuracy" in h]
    if evals:
        axes[1].plot([h["iteration"] for h in evals], [h["eval_accuracy"] for h in evals], "o-", label="held-out (greedy)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: RLConfig) -> int:
    ctx = initialize(cfg)
    try:
        run_dir = Path(cfg.run_dir)
        cache = run_dir / "cache"
        if ctx.is_rank0:
            load_tokenizer(cfg.data.tokenizer, cache)
        dist.barrier()
        tokenizer = load_tokenizer(cfg.data.tokenizer, cache)
        train_prompts, held = load_prompt_sets(cfg)
        get_loss(cfg.rl.loss)  # fail fast on a bad name
        bundle = build_training_bundle(cfg, len(tokenizer), total_steps=max(1, cfg.rl.iterations * cfg.rl.updates_per_iteration))
        step_func = make_rl_forward_step(cfg.rl.loss, cfg.rl.tau, cfg.rl.logprob_impl)
        trainer = Trainer(bundle, step_func, cfg.training.seq_length, micro_batch_size=1, loss_key="rl",
                          max_consecutive_nan_steps=cfg.training.max_consecutive_nan_steps)
        start, resumed = ckpt.start_point(run_dir, cfg.checkpoint.resume, cfg.checkpoint.load)
        if start is not None:  # a warm start (e.g. from SFT) loads the weights only
            trainer.load(start, load_optimizer=cfg.checkpoint.load_optimizer and resumed)
        if ctx.is_rank0:  # resumed: keep what preceded the checkpoint; fresh or warm start: start over
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.iteration if resumed else 0)
        stop_ids = sorted({tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids("<|end|>")}
                                                       if "<|end|>" in tokenizer.get_vocab() else set()))
        engine = GenerationEngine(unwrap(bundle.model[0]), max_batch_size=cfg.rollout.max_batch_size,
                                  max_seq_len=cfg.training.seq_length, eos_token_id=tokenizer.eos_token_id)
        rl_ctx = RLContext(cfg=cfg, trainer=trainer, rollout=make_rollout(cfg, engine, tokenizer, stop_ids),
                           pad_id=tokenizer.pad_token_id)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if (resumed and summary_path.is_file()) else {}
        if "before" not in summary:
            summary["before"] = evaluate(rl_ctx, held)
        first = trainer.state.iteration
        writer = MetricsWriter(run_dir, enabled=ctx.is_rank0, tensorboard=cfg.logging.tensorboard,
                               progress_bar=cfg.logging.progress_bar, log_interval=cfg.logging.log_interval, progress_total=cfg.rl.iterations,
                               progress_initial=first)
        writer.print(f"rl: {len(train_prompts)} prompts, {len(held)} held-out; k={cfg.rl.k}, tau={cfg.rl.tau}; "
                     f"held-out accuracy before {summary['before']['accuracy']:.3f}"
                     + (f"; resumed from {start} at iteration {first}" if resumed else ""))
        history = _read_history(run_dir / "metrics.jsonl") if resumed else []
        r = cfg.rl
        for it in range(first, r.iterations):
            rng = np.random.default_rng(cfg.training.seed * 7919 + it)
            pick = rng.choice(len(train_prompts), size=min(r.prompts_per_iteration, len(train_prompts)), replace=False)
            record = {"iteration": it + 1, "step": it + 1,
                      **rl_iteration(rl_ctx, it, [train_prompts[i] for i in pick])}
            trainer.state.iteration = it + 1
            if r.eval_interval and (it + 1) % r.eval_interval == 0 and it + 1 < r.iterations:
                ev = evaluate(rl_ctx, held)
                record.update(eval_accuracy=ev["accuracy"], eval_response_length=ev["response_length"])
            if it + 1 == r.iterations:
                summary["after"] = evaluate(rl_ctx, held)
                record.update(eval_accuracy=summary["after"]["accuracy"],
                              eval_response_length=summary["after"]["response_length"])
            writer.log(record, it + 1)
            history.append(record)
            stop = preemption.requested() and it + 1 < r.iterations
            if stop or (cfg.checkpoint.save_interval and (it + 1) % cfg.checkpoint.save_interval == 0) or (
                cfg.checkpoint.save_at_end and it + 1 == r.iterations
            ):
                if ctx.is_rank0:
                    _write_atomic(summary_path, json.dumps(summary, indent=1))  # a kill mid-write must not corrupt it
                saved = trainer.save(run_dir / "checkpoints", cfg.checkpoint.keep_last, extra={"config": to_dict(cfg)})
            if stop:
                preemption.confirm_saved(saved, trainer.state.step)
                writer.print(f"stopping after iteration {it + 1} (preemption requested); checkpoint saved")
                writer.close()
                return preemption.EXIT_PREEMPTED
        writer.close()
        if "after" not in summary:
            summary["after"] = evaluate(rl_ctx, held)
        if ctx.is_rank0:
            _write_atomic(summary_path, json.dumps(summary, indent=1))
            if history:
                _plot(history, run_dir / "rl_curves.png", summary["before"])
            b, a = summary["before"], summary["after"]
            print(f"rl: held-out accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, mean response length "
                  f"{b['response_length']:.2f} -> {a['response_length']:.2f}; run dir {run_dir}", flush=True)
        return 0
    finally:
        shutdown()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_history(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
