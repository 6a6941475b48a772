"""Run outputs on rank 0: ``metrics.jsonl`` (one JSON object per step), TensorBoard, and progress:
a tqdm bar on a terminal, else (batch logs, Slurm) one plain line every ``log_interval`` steps."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch


def peak_memory_mb() -> float:
    """Peak device memory on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines with ``step > last_step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Writes on global rank 0 only; a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, progress_total: Optional[int] = None,
                 progress_initial: int = 0, progress_bar: bool = True, log_interval: int = 1):
        self.enabled = enabled
        self.log_interval = log_interval
        self.total = progress_total
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress_bar and progress_total and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, initial=progress_initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    @classmethod
    def from_config(cls, cfg, enabled: bool, progress_total: Optional[int] = None,
                    progress_initial: int = 0) -> "MetricsWriter":
        """The writer of a command: ``cfg.run_dir``, ``cfg.logging``; progress over ``progress_total`` steps
        (iterations for rl), starting at ``progress_initial`` (a resumed run)."""
        lg = cfg.logging
        return cls(cfg.run_dir, enabled=enabled, tensorboard=lg.tensorboard, progress_total=progress_total,
                   progress_initial=progress_initial, progress_bar=lg.progress_bar, log_interval=lg.log_interval)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            post = {k: record[k] for k in ("loss", "lr", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()}, refresh=False)
            self._bar.update(1)
        elif step % self.log_interval == 0 or step == self.total:
            keys = ("loss", "reward", "accuracy", "lr", "grad_norm", "tokens_per_s", "step_time_s")
            fields = " | ".join(f"{k} {record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float)))
            print(f"step {step}/{self.total or '?'} | {fields}", flush=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tb = self._bar = None
