"""Run a test body on N ranks, each a fresh process, with real ``torch.distributed`` groups.

    def _body(rank, world_size, x):          # module level, so it can be pickled
        init_process_group(detect_env())     # gloo on CPU; reads RANK/WORLD_SIZE/MASTER_* set for it
        ...
        return something_picklable

    results = run_distributed(_body, 2, x)   # [result of rank 0, result of rank 1]

Ranks are forked from a "forkserver" that has imported torch and megatron.core once (importing them
is ~4 s of every rank's start on 2 cores, and the suite starts a few hundred ranks). The forkserver
has run no torch op (so no thread pool or CUDA context is forked) and is an exec'd process, not a fork
of pytest. Each child gets this process's environment *as it is at the call* (not the forkserver's,
from its start), plus RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT (a free port) and the ``env`` extras, before the test module or any ``megatron_kimi``
module is imported there (``fn`` and its args travel pickled and are unpickled after the environment is
set); only what torch and megatron.core read at import time is the forkserver's (CUDA starts lazily,
so CUDA_VISIBLE_DEVICES still applies). Each rank runs with ``torch.set_num_threads(1)``.

A rank that raises sends its traceback back; once a rank has failed the others get a short grace
period, then everything left is killed and ``RuntimeError`` lists every failed rank with its traceback.
Past ``timeout`` the hung ranks get SIGUSR1 (their Python stacks go to stderr via faulthandler), are
killed, and ``TimeoutError`` names them. Children are always terminated/killed and reaped (also on
KeyboardInterrupt), and each child exits by itself if this process dies (it watches a pipe only this
process writes to), so neither zombies nor orphans are left behind.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

import multiprocessing as mp

__all__ = ["run_distributed", "run_cli", "free_port"]

_FAIL_GRACE_S = 10.0  # how long the other ranks may still finish after one rank failed
_DEATH_GRACE_S = 2.0  # how long to wait for a message from a rank whose process already exited


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Imported once in the forkserver; nothing of the project (its modules read the environment at import).
_PRELOAD = ["torch", "torch.distributed", "megatron.core"]


def _context():
    # multiprocessing keeps one forkserver per process, started at the first Process.start(); the preload
    # list only matters before that, so setting it on every call is harmless.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _watch_parent(alive) -> None:
    # The test process holds the only write end of this pipe: EOF means it is gone. (The parent pid
    # says nothing here: it is the forkserver's, and the forkserver lives as long as any child does.)
    try:
        alive.recv()
    except (EOFError, OSError):
        pass
    os._exit(3)


def _entry(rank: int, env: dict, payload: bytes, alive, results: Any) -> None:
    """Child main: set the environment, then unpickle and run the body; report via ``results``."""
    threading.Thread(target=_watch_parent, args=(alive,), daemon=True).start()
    os.environ.clear()
    os.environ.update(env)
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":  # a CPU rank (tests/conftest.py): as on a CPU-only machine
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import faulthandler

        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        import torch

        torch.set_num_threads(1)
        fn, world_size, args = pickle.loads(payload)
        out = ("ok", pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - everything, SystemExit included, is reported
        out = ("error", traceback.format_exc())
    results.put((rank,) + out)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown problems must not mask the result
        pass
    results.close()
    results.join_thread()  # make sure the result is flushed before the process exits


def _stop(procs: list, grace: float = 0.0) -> None:
    """Let the children exit by themselves for ``grace`` s, then terminate, then kill; reap all."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0,
                    env: dict | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    payload = pickle.dumps((fn, world_size, args))  # fails here, clearly, if fn is not picklable
    ctx = _context()
    results = ctx.Queue()
    alive_r, alive_w = ctx.Pipe(duplex=False)
    port = free_port()
    procs = []
    pending: list[int] = []
    ok: dict[int, Any] = {}
    failed: dict[int, str] = {}
    try:
        for rank in range(world_size):
            rank_env = dict(os.environ)
            rank_env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)})
            rank_env.update({k: str(v) for k, v in (env or {}).items()})
            p = ctx.Process(target=_entry, args=(rank, rank_env, payload, alive_r, results),
                            name=f"dist-rank{rank}")  # not daemonic: fn may start processes itself
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        fail_deadline = None
        died_at: dict[int, float] = {}
        while len(ok) + len(failed) < world_size:
            now = time.monotonic()
            if now > deadline or (fail_deadline is not None and now > fail_deadline):
                break
            try:
                rank, status, data = results.get(timeout=0.1)
                if status == "ok":
                    ok[rank] = pickle.loads(data)
                else:
                    failed[rank] = data
                    fail_deadline = fail_deadline or time.monotonic() + _FAIL_GRACE_S
            except queue_mod.Empty:
                pass
            for rank, p in enumerate(procs):  # a rank that died without reporting (segfault, os._exit)
                if rank in ok or rank in failed or p.exitcode is None:
                    continue
                died_at.setdefault(rank, time.monotonic())
                if time.monotonic() - died_at[rank] > _DEATH_GRACE_S:
                    failed[rank] = f"process exited with code {p.exitcode} without reporting a result\n"
                    fail_deadline = fail_deadline or time.monotonic() + _FAIL_GRACE_S
        pending = [r for r in range(world_size) if r not in ok and r not in failed]
        if pending and not failed:  # a genuine timeout: dump the hung ranks' stacks to stderr first
            for r in pending[:8]:  # one at a time, so the dumps do not interleave
                if procs[r].is_alive() and procs[r].pid is not None:
                    print(f"\n===== run_distributed timeout: stacks of rank {r} (pid {procs[r].pid}) =====",
                          file=sys.stderr, flush=True)
                    os.kill(procs[r].pid, signal.SIGUSR1)
                    time.sleep(0.3)
    finally:
        _stop(procs, grace=5.0 if len(ok) == world_size else 0.0)
        alive_r.close()
        alive_w.close()
        results.close()
        results.join_thread()
    if failed:
        text = "".join(f"\n===== rank {r} failed =====\n{failed[r]}" for r in sorted(failed))
        if pending:
            text += f"\n===== ranks {pending} did not finish and were killed after the failure ====="
        raise RuntimeError(f"{len(failed)} of {world_size} ranks failed (ranks {sorted(failed)}):{text}")
    if pending:
        raise TimeoutError(f"ranks {pending} of {world_size} did not finish within {timeout} s "
                           "(killed; their stacks were dumped to stderr)")
    return [ok[r] for r in range(world_size)]


def _cli_entry(argv: list, env: dict, cwd: str, out_path: str, err_path: str, alive) -> None:
    """Child main of :func:`run_cli`: the environment, cwd and stdio of a fresh process, then the CLI."""
    threading.Thread(target=_watch_parent, args=(alive,), daemon=True).start()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):  # fd level: C extensions' output too
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["megatron-kimi", *argv]
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it when the forkserver imported it, not now
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    code = 1
    try:
        from megatron_kimi.cli import main

        code = main(argv)
    except SystemExit as e:  # argparse, and commands that exit with a code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception in a fresh interpreter: traceback, 1
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)


def run_cli(argv: list, *, cwd: str, env: dict | None = None, timeout: float = 600.0, nproc: int = 1):
    """``python -m megatron_kimi ARGV`` as ``subprocess.run(..., capture_output=True, text=True)`` would
    run it, but forked from the forkserver that has imported torch and megatron.core (~4 s of a fresh
    interpreter's start-up on 2 cores): its own process, environment (``env``, default this process's),
    cwd and stdout/stderr, exit code from ``main``. Returns a ``subprocess.CompletedProcess``; past
    ``timeout`` the child is killed and ``subprocess.TimeoutExpired`` raised. ``nproc > 1``: a real
    ``torch.distributed.run`` launch of that many ranks (a launcher's workers are fresh interpreters).
    Tests that signal the process use real subprocesses (tests/killing.py)."""
    import subprocess
    import tempfile

    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "megatron_kimi",
               *argv]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    ctx = _context()
    alive_r, alive_w = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="run_cli_") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        p = ctx.Process(target=_cli_entry, args=(list(argv), dict(os.environ if env is None else env), str(cwd),
                                                  out_path, err_path, alive_r), name="megatron-kimi-cli")
        try:
            p.start()
            p.join(timeout)
            timed_out = p.is_alive()
        finally:
            _stop([p])
            alive_r.close()
            alive_w.close()
        read = lambda path: open(path, errors="replace").read() if os.path.exists(path) else ""  # noqa: E731
        stdout, stderr = read(out_path), read(err_path)
    args = ["megatron-kimi", *argv]
    if timed_out:
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(args, p.exitcode, stdout, stderr)
