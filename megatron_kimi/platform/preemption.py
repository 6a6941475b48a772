"""Preemption: a signal asks for a checkpoint at the next step boundary, then a clean exit.

Slurm sends ``SIGUSR1`` ahead of the time limit (``#SBATCH --signal=B:USR1@300`` reaches the batch
shell, which ``slurm/common.sh`` forwards to the ``srun`` tasks; ``scancel --signal=USR1 --batch JOB``
does the same on demand). Every rank installs :func:`install` first thing; the training loops call
:func:`requested` once per step (or RL iteration), which all-reduces the flag over the world so all
ranks agree even when only some got the signal; on True they save a checkpoint and the command exits
with :data:`EXIT_PREEMPTED`. The batch script sees that code and runs ``scontrol requeue``; the
requeued job resumes from the checkpoint (``checkpoint.resume`` is on by default).

The received-signal flag is module state because a signal handler has nowhere else to write.
"""

from __future__ import annotations

import signal
from typing import Iterable

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the batch script requeues on it
DEFAULT_SIGNALS = (signal.SIGUSR1,)

_received: list = []


def _handler(signum, _frame) -> None:
    _received.append(signum)


def install(signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
    """Install the flag-setting handler (idempotent; main thread only, as Python requires).

    ``srun`` delivers a forwarded signal to *every* process of the task, including multiprocessing's
    resource tracker and forkserver, which would die of it (default action). They are started here
    with the signals blocked, and a blocked mask survives their fork+exec, so they never see them.
    """
    signals = tuple(signals)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        from multiprocessing import forkserver, resource_tracker

        resource_tracker.ensure_running()
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    for s in signals:
        signal.signal(s, _handler)


def received_locally() -> bool:
    return bool(_received)


def requested() -> bool:
    """True on every rank iff any rank received a preemption signal (a collective when distributed)."""
    import torch
    import torch.distributed as dist

    flag = 1 if _received else 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return bool(flag)


def reset() -> None:
    """Forget received signals (tests)."""
    _received.clear()
