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
from typing import Callable, Dict, List, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kimi.training import checkpoint as ckpt
from megatron_kimi.training.checkpointer import Checkpointer
from megatron_kimi.training.lm_step import named_report, reduce_reports
from megatron_kimi.training.metrics import MetricsWriter, peak_memory_mb
from megatron_kimi.training.optim import inner_optimizers, move_optimizer_state, to_pinned_cpu
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
    """The micro-batch reports (``[loss_sum, loss_count, extra sums...]``, ``lm_step.REPORT_FIELDS``)
    summed over the global batch, on every rank."""
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
    """Optimizer steps on a model bundle; the one owner of its model, optimizer and :class:`TrainState`.

    Loops drive it through :meth:`step` (one optimizer step that advances the state), :meth:`fit`
    (steps over a :class:`BatchSource`), :meth:`end_iteration`, :meth:`reset_optimizer_state`,
    :meth:`save` / :meth:`load`; ``model`` (the chunks) is for forward-only passes and rollout engines.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        forward_step_func: Callable,
        seq_length: int,
        micro_batch_size: int,
        loss_key: str = "lm_loss",
        max_consecutive_nan_steps: int = 5,
    ):
        self._bundle = bundle
        self.max_consecutive_nan_steps = max_consecutive_nan_steps
        self.nan_streak = 0  # non-finite steps in a row, up to now
        self.forward_step_func = forward_step_func
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.loss_key = loss_key
        self.state = TrainState()
        self.optimizer_offloaded = False  # offload_optimizer() ... reload_optimizer()

    @property
    def model(self) -> List:
        """The (DDP-wrapped) model chunks."""
        return self._bundle.model

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, microbatches: List[Dict[str, torch.Tensor]]) -> Dict[str, object]:
        """One optimizer step on ``microbatches``; the state is not advanced (see :meth:`step`).

        Returns the step's metrics; ``"report"`` is the global report by field name
        (``lm_step.REPORT_FIELDS``: ``loss_sum``, ``loss_count``, ...)."""
        assert not self.optimizer_offloaded, "train_step() with the optimizer state offloaded: reload_optimizer() first"
        b = self._bundle
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
        report = named_report(global_report(reports, self.loss_key), self.loss_key)
        loss_sum, tokens = report["loss_sum"], report["loss_count"]
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

    def step(self, microbatches: List[Dict[str, torch.Tensor]], samples: int = 0, tokens: int = 0) -> Dict[str, object]:
        """:meth:`train_step`, then the state counts it (and the ``samples`` / ``tokens`` it consumed)."""
        metrics = self.train_step(microbatches)
        self.state.step += 1
        self.state.consumed_samples += samples
        self.state.consumed_tokens += tokens
        return metrics

    def set_stage(self, stage: int, seq_length: int, scheduler=None) -> None:
        """Train stage ``stage`` (sft) at ``seq_length``. With a ``scheduler``, a fresh stage: its own LR
        schedule and data position (``consumed_samples`` counts within a stage); the optimizer state
        carries over."""
        if scheduler is not None:
            self._bundle.scheduler = scheduler
            self.state = TrainState(step=self.state.step, stage=stage, nan_steps=self.state.nan_steps)
        self.state.stage = stage
        self.seq_length = seq_length

    def end_iteration(self) -> None:
        """An RL iteration is done (its count is checkpointed with the state)."""
        self.state.iteration += 1

    def reset_optimizer_state(self) -> None:
        """Zero Adam's moments and step counters (the paper resets the optimizer every RL iteration)."""
        for opt in inner_optimizers(self._bundle.optimizer):
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()

    def offload_optimizer(self) -> int:
        """Move the optimizer state (Adam's moments) to pinned CPU memory while a colocated rollout engine
        needs the GPU; returns the bytes moved (0 on CPU, where there is nowhere to move it)."""
        assert not self.optimizer_offloaded, "offload_optimizer() twice"
        self.optimizer_offloaded = True
        if not torch.cuda.is_available():
            return 0
        return move_optimizer_state(self._bundle.optimizer, to_pinned_cpu)

    def reload_optimizer(self) -> int:
        """Undo :meth:`offload_optimizer` (before the next optimizer step); returns the bytes moved."""
        assert self.optimizer_offloaded, "reload_optimizer() without offload_optimizer()"
        self.optimizer_offloaded = False
        if not torch.cuda.is_available():
            return 0
        device = torch.device("cuda", torch.cuda.current_device())
        nbytes = move_optimizer_state(self._bundle.optimizer, lambda t: t.to(device, non_blocking=True))
        torch.cuda.current_stream().synchronize()  # the pinned buffers may be freed after this
        return nbytes

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, source: BatchSource, writer: MetricsWriter, total_steps: int, checkpointer: Checkpointer,
            tokens_per_sample: int = 0, extra_record: Optional[dict] = None,
            report_metrics: Optional[Callable[[Dict[str, object], Dict[str, float]], None]] = None) -> List[dict]:
        """Train until ``total_steps`` or a preemption stop (``checkpointer.stopped``); returns this
        call's per-step records. ``report_metrics(metrics, report)``: turns a loss's step report into
        its named metrics (in place, before the record is written; e.g. DPO's ``rewards/*``)."""
        s = self.state
        history = []
        while s.step < total_steps:
            t0 = time.perf_counter()
            step_tokens = source.global_batch_size * tokens_per_sample
            metrics = self.step(source.microbatches(s.consumed_samples), source.global_batch_size, step_tokens)
            dt = time.perf_counter() - t0
            report = metrics.pop("report")
            if report_metrics is not None:
                report_metrics(metrics, report)
            record = {"step": s.step, **(extra_record or {}), **metrics, "tokens": step_tokens, "tokens_per_s": step_tokens / dt,
                      "step_time_s": dt, "consumed_samples": s.consumed_samples, "peak_memory_mb": peak_memory_mb()}
            writer.log(record, s.step)
            history.append(record)
            if checkpointer.save(s.step, last_step=s.step == total_steps):
                writer.print(f"stopping at step {s.step} (preemption requested); checkpoint saved")
                break
        return history

    def save(self, ckpt_root: Path, keep_last: int = 0, extra: Optional[dict] = None) -> Path:
        if self.optimizer_offloaded:  # the checkpoint code expects the state where the parameters are
            self.reload_optimizer()
            try:
                return self.save(ckpt_root, keep_last, extra)
            finally:
                self.offload_optimizer()
        b = self._bundle
        return ckpt.save(ckpt_root, self.state.step, b.model, b.optimizer, b.scheduler, asdict(self.state),
                         extra=extra, keep_last=keep_last)

    def load(self, ckpt_dir: Path, load_optimizer: bool = True) -> bool:
        """Load ``ckpt_dir``; with ``load_optimizer`` (and a checkpoint that has it) also the optimizer,
        LR schedule and :class:`TrainState`. Returns whether the training state was restored."""
        b = self._bundle
        common = ckpt.read_common(ckpt_dir)
        with_optim = load_optimizer and "optimizer" in common.get("contents", ("optimizer",))
        state = ckpt.load(ckpt_dir, b.model, b.optimizer if with_optim else None, b.scheduler if with_optim else None)
        if with_optim and state:
            self.state = TrainState(**{k: state[k] for k in asdict(TrainState()) if k in state})
            return True
        return False
