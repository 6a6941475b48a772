"""What ``train``, ``sft`` and ``rl`` share, in one helper: :func:`run_job`.

    ctx = initialize(cfg)                        # process group, parallel state, seeds
    start = start_point(...)                     # the run's own latest checkpoint (resume), else checkpoint.load
    job = build(ctx, start)                      # the command's data and trainer (rl: and its rollout backend)
    trainer.load(start)                          # rl: a warm start (not a resume) takes the weights only
    metrics.jsonl cut back to the start point; MetricsWriter; "resumed from ..."
    job.fit(run)                                 # the command's loop; run.checkpointer decides every save / stop
    job.summary(run)                             # rank 0
    exit EXIT_PREEMPTED (75) if a preemption stopped the run, else 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_kimi.platform import preemption
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.checkpointer import Checkpointer
from megatron_kimi.training.metrics import MetricsWriter, truncate_metrics
from megatron_kimi.training.runtime import DistContext, initialize, shutdown
from megatron_kimi.training.trainer import Trainer


@dataclass
class Run:
    """What :func:`run_job` hands a job's ``fit`` and ``summary``."""

    ctx: DistContext
    run_dir: Path
    writer: MetricsWriter
    checkpointer: Checkpointer  # .stopped: a preemption stopped the run (checkpoint saved and confirmed)
    start: Optional[Path]  # the checkpoint the run started from
    resumed: bool  # the training state (step, data position, optimizer, LR schedule) came from ``start``


@dataclass
class Job:
    """A command's part: its trainer and loop."""

    trainer: Trainer
    total: int  # steps of the whole run (rl: iterations), for the progress display
    fit: Callable[[Run], None]  # train to the end, or until run.checkpointer stops the run
    summary: Callable[[Run], None] = lambda run: None  # on rank 0, after fit
    unit: str = "step"  # what the "step" of metrics.jsonl counts: optimizer steps, or "iteration" (rl)
    weights_only_warm_start: bool = False  # rl: checkpoint.load of another run (e.g. SFT) starts a new run
    resume_note: str = ""  # appended to "resumed from CKPT at step N"

    def position(self) -> int:
        """Steps (or iterations) done: where metrics.jsonl and the progress display continue."""
        return self.trainer.state.iteration if self.unit == "iteration" else self.trainer.state.step


def run_job(cfg, build: Callable[[DistContext, Optional[Path]], Job]) -> int:
    """Run a command (see the module docstring); returns its exit code."""
    ctx = initialize(cfg)
    try:
        run_dir = Path(cfg.run_dir)
        start, own = ckpt.start_point(run_dir, cfg.checkpoint.resume, cfg.checkpoint.load)
        job = build(ctx, start)
        resumed = False
        if start is not None:
            resumed = job.trainer.load(start, load_optimizer=cfg.checkpoint.load_optimizer
                                       and (own or not job.weights_only_warm_start))
        first = job.position()
        if ctx.is_rank0:  # a resumed run rewrites what followed its checkpoint; a fresh one starts over
            truncate_metrics(run_dir / "metrics.jsonl", first)
        writer = MetricsWriter.from_config(cfg, ctx.is_rank0, progress_total=job.total, progress_initial=first)
        if start is not None:
            writer.print(f"resumed from {start} at {job.unit} {first}{job.resume_note}" if resumed
                         else f"initialized from the weights of {start}")
        run = Run(ctx=ctx, run_dir=run_dir, writer=writer, checkpointer=Checkpointer.from_config(cfg, job.trainer),
                  start=start, resumed=resumed)
        try:
            job.fit(run)
        finally:
            writer.close()
        if ctx.is_rank0:
            job.summary(run)
        return preemption.EXIT_PREEMPTED if run.checkpointer.stopped else 0
    finally:
        shutdown()
