"""platform.preemption: a SIGUSR1 sent to every process of the task (as Slurm's srun forwarding does)
is recorded by the rank and kills none of its helpers — the spawned multiprocessing Manager that
dist_checkpointing's writer keeps for the run, nor a forked worker.

Each case runs in a fresh interpreter: install() changes the process's signal mask for good.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)

# Started in its own session so that killpg reaches exactly this process tree, like Slurm's proctrack.
SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, sys, time
    from megatron_kimi.platform import preemption

    def forked():
        time.sleep(1.0)  # the group signal arrives while it runs

    if __name__ == "__main__":
        if sys.argv[1] == "install":
            preemption.install()
        else:  # what install() did before: a handler in the rank only, helpers keep the default action
            signal.signal(signal.SIGUSR1, lambda *_: None)
        manager = mp.get_context("spawn").Manager()  # what filesystem_async starts at the first save
        queue = manager.Queue()
        child = mp.get_context("fork").Process(target=forked)
        child.start()
        os.killpg(os.getpgid(0), signal.SIGUSR1)  # every process of the task, helpers included
        time.sleep(0.3)
        queue.put("manager alive")
        print(queue.get(timeout=10), flush=True)
        child.join(10)
        print("forked child exitcode", child.exitcode, flush=True)  # -10 if SIGUSR1 killed it
        print("received", preemption.received_locally(), preemption.requested(), flush=True)
        preemption.reset()
        print("after reset", preemption.received_locally(), flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal: the rank itself is not killed either
        print("again", preemption.received_locally(), flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=90, start_new_session=True)


def test_group_signal_is_recorded_and_kills_no_helper():
    out = _run("install")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        "manager alive",
        "forked child exitcode 0",
        "received True True",
        "after reset False",
        "again True",
    ], out.stdout + out.stderr


def test_a_handler_alone_lets_the_signal_kill_the_manager():
    """The failure install() prevents (and proof that this test's signal really reaches the helpers)."""
    out = _run("handler-only")
    assert out.returncode != 0
    assert "manager alive" not in out.stdout
    dead_manager = ("BrokenPipeError", "ConnectionResetError", "ConnectionRefusedError", "EOFError")
    assert any(e in out.stderr for e in dead_manager), out.stderr[-2000:]
