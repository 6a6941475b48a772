"""The training loop every stage uses (pretrain-style LM, SFT, RL train phase).

One optimizer step = Megatron's ``get_forward_backward_func`` over this DP rank's micro-batches
(1F1B under PP, interleaved with virtual stages), then the (distributed) optimizer step.
A ``BatchSource`` says which micro-batches make up the step after ``consumed`` samples, so the
data position is a number that checkpoints and resumes exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kimi.platform import preemption
from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.lm_step import reduce_reports
from megatron_kimi.training.metrics import MetricsWriter, peak_memory_mb
from megatron_kimi.training.runtime import ModelBundle


class BatchSource(Protocol):
    def microbatches(self, consumed_samples: int) -> List[Dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch that starts at ``consumed_samples``."""

    @property
    def global_batch_size(self) -> int: ...


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    iteration: int = 0  # RL iterations done
    stage: int = 0  # multi-stage schedules (sft): consumed_samples counts within the stage
    nan_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def global_report(reports: list, key: str = "lm_loss") -> List[float]:
    """The micro-batch reports (``[loss_sum, count, extra sums...]``) summed over the global batch,
    on every rank."""
    t = reduce_reports(reports, key).to(_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    else:
        t.zero_()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return [float(x) for x in t]


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


def _any_nonfinite_grad(chunks) -> bool:
    """True on every rank when any rank holds a NaN/inf gradient (a world all-reduce).

    The local grad buffers are checked whole, also the parts a reduce-scatter did not reduce into
    this rank: a non-finite partial gradient makes the reduced one non-finite too."""
    finite = []  # device booleans: one host sync for the whole check, not one per buffer
    for chunk in chunks:
        buffers = getattr(chunk, "buffers", None)
        if buffers is not None:
            grads = [buf.grad_data for buf in buffers + list(getattr(chunk, "expert_parallel_buffers", []))]
        else:
            grads = [getattr(p, "main_grad", p.grad) for p in chunk.parameters()]
        finite += [torch.isfinite(g).all() for g in grads if g is not None]
    bad = torch.zeros(1, device=_device())
    if finite:
        bad = (~torch.stack(finite).to(bad.device).all()).float().reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class Trainer:
    def __init__(
        self,
        bundle: ModelBundle,
        forward_step_func: Callable,
        seq_length: int,
        micro_batch_size: int,
        loss_key: str = "lm_loss",
        max_consecutive_nan_steps: int = 5,
    ):
        self.b = bundle
        self.max_consecutive_nan_steps = max_consecutive_nan_steps
        self.nan_streak = 0  # non-finite steps in a row, up to now
        self.forward_step_func = forward_step_func
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.loss_key = loss_key
        self.state = TrainState()
        self.stopped = False  # fit() ended early on should_stop() (preemption)

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, microbatches: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        b = self.b
        for chunk in b.model:
            chunk.zero_grad_buffer()
        b.optimizer.zero_grad()
        b.scheduler.step(increment=1)  # the lr of step k (1-based) is schedule(k)
        lr = b.optimizer.param_groups[0]["lr"]
        if len(b.model) > 1:
            data: object = [iter(microbatches) for _ in b.model]
        else:
            data = iter(microbatches)
        reports = get_forward_backward_func()(
            forward_step_func=self.forward_step_func,
            data_iterator=data,
            model=b.model if len(b.model) > 1 else b.model[0],
            num_microbatches=len(microbatches),
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=False,
        )
        report = global_report(reports, self.loss_key)
        loss_sum, tokens = report[0], report[1]
        # Like Megatron's check_for_nan_in_loss_and_grad, but a NaN/inf step is skipped (no parameter,
        # optimizer-state or LR-schedule change) and counted; only a streak of them stops the run.
        nonfinite = not math.isfinite(loss_sum) or _any_nonfinite_grad(b.model)
        if nonfinite:
            b.scheduler.step(increment=-1)
            ok, grad_norm = False, None
            self.nan_streak += 1
            self.state.nan_steps += 1
        else:
            ok, grad_norm, _ = b.optimizer.step()
            self.nan_streak = 0
        metrics = {
            "report": report,
            "loss": loss_sum / max(tokens, 1.0),
            "lr": float(lr),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_tokens": tokens,
            "skipped": 0 if ok else 1,
            "nan_skipped": int(nonfinite),
            "nan_steps": self.state.nan_steps,
        }
        if self.nan_streak >= self.max_consecutive_nan_steps:
            raise NonFiniteLossError(
                f"{self.nan_streak} optimizer steps in a row had a non-finite loss or gradient (step "
                f"{self.state.step + 1}: loss {metrics['loss']}); each was skipped, and "
                f"training.max_consecutive_nan_steps={self.max_consecutive_nan_steps} stops the run here. "
                f"The last was the global batch at consumed_samples={self.state.consumed_samples}: check the "
                "data there and the learning rate")
        return metrics

    # ---- the loop -----------------------------------------------------------------------
    def fit(
        self,
        source: BatchSource,
        writer: MetricsWriter,
        total_steps: int,
        ckpt_root: Path,
        save_interval: int = 0,
        save_at_end: bool = True,
        keep_last: int = 0,
        tokens_per_sample: int = 0,
        extra_state: Optional[dict] = None,
        extra_record: Optional[dict] = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> List[dict]:
        """Train until ``total_steps``; returns this call's per-step records."""
        s = self.state
        history = []
        while s.step < total_steps:
            t0 = time.perf_counter()
            metrics = self.train_step(source.microbatches(s.consumed_samples))
            dt = time.perf_counter() - t0
            s.step += 1
            s.consumed_samples += source.global_batch_size
            step_tokens = source.global_batch_size * tokens_per_sample
            s.consumed_tokens += step_tokens
            metrics.pop("report")
            record = {"step": s.step, **(extra_record or {}), **metrics, "tokens": step_tokens, "tokens_per_s": step_tokens / dt,
                      "step_time_s": dt, "consumed_samples": s.consumed_samples, "peak_memory_mb": peak_memory_mb()}
            writer.log(record, s.step)
            history.append(record)
            stop = should_stop()
            if (save_interval and s.step % save_interval == 0) or stop or (save_at_end and s.step == total_steps):
                saved = self.save(ckpt_root, keep_last, extra_state)
            if stop:
                preemption.confirm_saved(saved, s.step)
                writer.print(f"stopping at step {s.step} (preemption requested); checkpoint saved")
                self.stopped = True
                break
        return history

    def save(self, ckpt_root: Path, keep_last: int = 0, extra: Optional[dict] = None) -> Path:
        return ckpt.save(ckpt_root, self.state.step, self.b.model, self.b.optimizer, self.b.scheduler,
                         asdict(self.state), extra=extra, keep_last=keep_last)

    def load(self, ckpt_dir: Path, load_optimizer: bool = True) -> None:
        common = ckpt.read_common(ckpt_dir)
        with_optim = load_optimizer and "optimizer" in common.get("contents", ("optimizer",))
        state = ckpt.load(ckpt_dir, self.b.model, self.b.optimizer if with_optim else None,
                          self.b.scheduler if with_optim else None)
        if with_optim and state:
            self.state = TrainState(**{k: state[k] for k in asdict(TrainState()) if k in state})
