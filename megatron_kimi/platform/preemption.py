"""Preemption: a signal asks for a checkpoint at the next step boundary, then a clean exit.

Slurm sends ``SIGUSR1`` ahead of the time limit (``#SBATCH --signal=B:USR1@300`` reaches the batch
shell, which ``slurm/common.sh`` forwards to the ``srun`` tasks; ``scancel --signal=USR1 --batch JOB``
does the same on demand). Every rank installs :func:`install` first thing; the training loops call
:func:`requested` once per step (or RL iteration), which all-reduces the flag over the world so all
ranks agree even when only some got the signal; on True they save a checkpoint, :func:`confirm_saved`
records that every rank finished it and that it is complete, and the command exits with
:data:`EXIT_PREEMPTED`. The batch script requeues only when that record and the checkpoint's
completeness check agree; the requeued job resumes from the checkpoint (``checkpoint.resume`` is on
by default).

Why the signal is *blocked*, not just handled: Slurm delivers a forwarded signal to every process of
the task (proctrack signals the whole process tree), including helpers a rank starts at any time —
dist_checkpointing's writer spawns a multiprocessing Manager at the first save and keeps it for the
run, and its fork workers during every save. A helper has the default action (terminate), so a
SIGUSR1 arriving after the first periodic save, or while another rank's signal already started the
preemption save, killed the Manager and with it the very save that was meant to keep the work
(``BrokenPipeError``/``ConnectionResetError`` in ``filesystem_async``). A blocked mask is inherited
by every thread and child created later and survives exec, so no helper can die of it; the rank
itself collects the pending signal with ``sigtimedwait`` when the loop asks.

The received-signal flag is module state because a signal handler has nowhere else to write.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterable, Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the batch script requeues on it
DEFAULT_SIGNALS = (signal.SIGUSR1,)
CONFIRM_FILE = "preempted.json"  # in checkpoints/: written after every rank saved the stop checkpoint

_received: list = []
_installed: tuple = ()


def _handler(signum, _frame) -> None:
    _received.append(signum)


def install(signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
    """Block the signals for this process and all it starts later; main thread only, as Python requires.

    The flag-setting handler stays installed for threads that existed before this call (their mask
    does not block the signals, so the kernel may pick one of them); every other delivery stays
    pending until :func:`received_locally` collects it. multiprocessing's resource tracker and
    forkserver are started now, so they inherit the mask whoever starts them later.
    """
    global _installed
    signals = tuple(signals)
    for s in signals:
        signal.signal(s, _handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    _installed = tuple(sorted(set(_installed) | set(signals)))
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    forkserver.ensure_running()


def received_locally() -> bool:
    """Whether this process got a preemption signal (collects pending blocked ones)."""
    while _installed:
        info = signal.sigtimedwait(_installed, 0)
        if info is None:
            break
        _received.append(info.si_signo)
    return bool(_received)


def requested() -> bool:
    """True on every rank iff any rank received a preemption signal (a collective when distributed)."""
    import torch
    import torch.distributed as dist

    flag = 1 if received_locally() else 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return bool(flag)


def confirm_saved(ckpt_dir: str | Path, step: int) -> Optional[Path]:
    """After the stop checkpoint: every rank reports success, rank 0 checks the checkpoint is complete
    (the ``inspect_checkpoint`` check) and writes :data:`CONFIRM_FILE` next to it (in ``checkpoints/``),
    the batch script's proof that requeueing loses nothing. Collective; returns the file on rank 0."""
    import torch
    import torch.distributed as dist

    from megatron_kimi.ckpt_tools.inspect import verify

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if world > 1:
        t = torch.ones(1, dtype=torch.int32)  # reaching here means this rank's part of the save returned
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        assert int(t.item()) == world, f"{int(t.item())} of {world} ranks confirmed the checkpoint"
    if rank != 0:
        return None
    ckpt_dir = Path(ckpt_dir)
    _, common, _ = verify(ckpt_dir)  # raises CheckpointError naming the file if anything is missing
    saved = int(common.get("train_state", {}).get("step", -1))
    assert saved == step, f"{ckpt_dir} holds step {saved}, expected {step}"
    out = ckpt_dir.parent / CONFIRM_FILE
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"checkpoint": str(ckpt_dir.resolve()), "step": step, "ranks": world}) + "\n")
    os.replace(tmp, out)
    return out


def reset() -> None:
    """Forget received signals (tests)."""
    _received.clear()
    if _installed:
        received_locally()
        _received.clear()
