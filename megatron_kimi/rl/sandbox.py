"""Run untrusted Python programs (code-RL responses) in a sandbox.

``run_sandboxed(code, stdin, ...)`` runs ``python3 -I -S main.py`` with ``stdin`` on its standard
input and returns a :class:`SandboxResult`.  Every call is independent (fresh directory, fresh
namespaces); the function is thread-safe, so many calls may run in parallel from a thread pool
(:func:`run_sandboxed_many`).

How a run is built
------------------
``parent (trainer) --Popen(start_new_session)--> [wrapper] --> bootstrap (python -I -S -c ...)
--fork--> program``.  The *wrapper* creates namespaces (``bwrap`` or ``unshare``; none in the
``"none"`` backend).  The *bootstrap* is a small Python script (passed with ``-c``; no file the
program could tamper with; :mod:`megatron_kimi.rl.sandbox_bootstrap`) that finishes the setup (as root
when the trainer is root), forks, and in the child joins the run's cgroup, sets the rlimits, drops
privileges and ``execve``\\ s ``python -I -S -c PRELUDE`` (an audit hook that counts refused network
and filesystem attempts, then ``main.py`` as ``__main__``); the parent half waits for the program and
reports its wait status and CPU time through a pipe that the program never holds (close-on-exec).
No ``preexec_fn`` is used, so calling from threads is safe.

Backends (``backend="auto"`` picks the first that passes a one-time probe; the environment
variable ``MEGATRON_KIMI_SANDBOX_BACKEND`` or the ``backend=`` argument can force one):

``"bwrap"`` (bubblewrap installed): ``--unshare-pid --unshare-net --unshare-ipc --unshare-uts
    --unshare-cgroup-try --die-with-parent``, the whole host filesystem bind-mounted **read-only**
    (``--ro-bind / /``), a fresh ``/dev`` and ``/proc``, and the work directory a private,
    size-limited tmpfs (``--size disk_mb``).  Run as root, bwrap is used in its privileged mode (no
    user namespace) and the bootstrap drops to the unprivileged uid below; run as a normal user,
    bwrap creates a user namespace (``--unshare-user``) and keeps no capabilities.
``"unshare"`` (root only; util-linux ``unshare``): ``--mount --propagation private --pid --fork
    --kill-child --mount-proc --ipc --uts --net``; inside, the bootstrap (PID 1 of the new PID
    namespace) remounts every mount read-only except ``/proc``, ``/dev`` and ``/dev/pts`` (so
    ``/``, ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/sys`` and the repository are read-only; device
    nodes like ``/dev/null`` stay usable), then mounts a size-limited tmpfs on the work directory.
``"none"``: no namespaces (documented best effort, see below).

Limits per sandbox (cgroups)
----------------------------
Where :func:`cgroup_support` finds writable cgroups (:mod:`megatron_kimi.rl.sandbox_cgroup`: cgroup v2
with the memory and pids controllers, else cgroup v1 memory + pids hierarchies, e.g. root on a hybrid
host), every run gets its own cgroup, joined by the program's first process before it drops
privileges: ``memory_mb`` + 64 MiB is the budget of **all** its processes together (page cache and
the tmpfs work directory included, no swap; the OOM killer acts inside the cgroup only; the 64 MiB
let one process meet its ``RLIMIT_AS`` of ``memory_mb`` first), ``max_procs`` the
number of its processes and threads (``pids.max``; ``RLIMIT_NPROC`` stays as a backstop 8 above it),
and a wall timeout kills the whole cgroup (``cgroup.kill``).  Afterwards the cgroup must be empty; it
is removed.  ``cgroup="off"`` (or ``MEGATRON_KIMI_SANDBOX_CGROUP=off``) forces the fallback,
``"require"`` fails instead of falling back.

**Fallback** (no writable cgroups, e.g. a non-root user without a delegated cgroup): the per-process
rlimits below only.  Then the bound on the sandbox's memory is ``memory_mb`` of address space per
process times ``max_procs`` processes (``RLIMIT_AS`` x ``RLIMIT_NPROC``, per uid: as root each run has
its own uid), not ``memory_mb``; ``mechanisms`` says ``memory:per-process-RLIMIT_AS(no-cgroup)``.

Status and counts
-----------------
``SandboxResult.limits`` counts how often each limit tripped: ``memory`` (OOM kills in the cgroup +
uncaught ``MemoryError`` tracebacks on stderr), ``pids`` (forks refused: ``pids.events``, or in the
fallback the ``os.fork`` failures seen by the audit prelude), ``network`` and ``fs`` (attempts to
connect/resolve, or to write/create/remove outside the work directory, counted by an audit hook that
runs before ``main.py``: :mod:`megatron_kimi.rl.sandbox_bootstrap`; the kernel-side isolation
refuses them, the hook only counts), and ``timeout`` / ``cpu`` / ``output`` / ``file_size`` (the kill
reason).  ``SandboxResult.status`` is the first that tripped in the order of :data:`STATUSES`
(``memory``, ``pids``, ``timeout``, ``cpu``, ``output``, ``file_size``, ``network``, ``fs``), else
``exit`` (non-zero exit or a signal), ``ok`` or ``sandbox_error``.

The interpreter is the first of ``$MEGATRON_KIMI_SANDBOX_PYTHON``, the trainer's own python,
``/usr/bin/python3``, ``/usr/local/bin/python3`` that the sandbox uid can execute (as root, a pyenv
under the 0700 ``/root`` is skipped); with ``-S`` only its standard library is importable.

Enforced in every backend
-------------------------
* Fresh private directory per run (``tempfile.mkdtemp``), used as cwd, ``HOME`` and ``TMPDIR``;
  removed afterwards.  The program is ``main.py`` in it; its stdin comes from a file that only the
  sandbox's owner can read.
* Environment scrubbed: only ``PATH=/usr/local/bin:/usr/bin:/bin``, ``HOME``, ``TMPDIR``,
  ``LANG``/``LC_ALL=C.UTF-8``; ``python -I -S`` ignores ``PYTHON*`` variables, user site and
  ``site-packages``.
* rlimits on the program: ``RLIMIT_CPU`` (soft ``cpu_s``, hard ``cpu_s + 1``: SIGXCPU then
  SIGKILL), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_NPROC`` (``max_procs``), ``RLIMIT_FSIZE``
  (``max_file_mb``), ``RLIMIT_NOFILE`` (``max_open_files``), ``RLIMIT_CORE = 0``.
* New session and process group (``start_new_session=True``); the wall timeout ``timeout_s``
  (counted from the spawn, so it includes the ~0.1 s sandbox start-up) kills the whole group with ``killpg(SIGKILL)``; output beyond ``max_output_bytes`` per stream kills it
  too (``killed_reason="output_limit"``).
* As root: the program runs as an **unprivileged uid/gid with no supplementary groups** and
  ``PR_SET_NO_NEW_PRIVS`` (setuid binaries cannot regain root).  ``RLIMIT_NPROC`` does not apply to
  root, and it is counted per uid across *all* processes of that uid, so each concurrent run leases
  its own uid from a pool (``MEGATRON_KIMI_SANDBOX_UIDS="first-last"``, default
  2100000000-2100001023 when the uid map allows it, else only 65534 ``nobody``, then shared),
  exclusive across processes via ``flock`` on files in a root-only lock directory; a uid that still
  owns processes (say zombies not yet reaped by PID 1) is skipped.  A fork bomb then
  only exhausts its own uid's ``max_procs``; other sandboxes and the host are unaffected.  The work
  directory is owned by that uid (mode 0700); the repository, ``/root`` (0700) etc. are not
  writable by it.
* Cleanup: with a PID namespace (bwrap, unshare) the kernel kills every process of the sandbox when
  its init exits, even ones that called ``setsid``.  In the ``"none"`` backend the bootstrap is a
  child subreaper (``PR_SET_CHILD_SUBREAPER``: orphans, even after ``setsid``, become its children)
  and, after the program exits, a helper running as the leased uid does ``kill(-1, SIGKILL)`` (every
  process of that uid at once, so escaped children cannot out-fork it), then the bootstrap reaps
  them.  On a wall timeout the trainer first kills the program (the same ``kill(-1)`` helper as root,
  else the program's process group) so that the subreaper can sweep, then the whole session.

Best effort / not enforced
--------------------------
* ``"none"`` backend: no network isolation, no read-only filesystem (as root the uid drop still
  prevents writes to root-owned paths, but world-writable ``/tmp``, ``/var/tmp`` and ``/dev/shm``
  are writable and the directory is not size-limited, only per-file ``RLIMIT_FSIZE`` and the wall
  time bound it).  As a non-root user without namespaces there is no uid drop: the program can
  write wherever the user can, ``RLIMIT_NPROC`` is set to (the user's current task count +
  ``max_procs``), and leftover processes are found through the subreaper only (one that escapes
  both the process group and the subreaper's 2 s sweep can survive).
* Reading: the program can read whatever is world-readable on the host (bwrap and unshare expose
  the host filesystem read-only; nothing secret should be world-readable).
* Memory without cgroups: ``RLIMIT_AS`` limits address space per process, not the sum over
  ``max_procs`` processes; tmpfs pages (``disk_mb``) are RAM too.
* Counting ``network`` / ``fs`` / fallback ``pids`` covers the program's Python process and its
  forks (the audit hook), not other executables it starts, and a program can close the fd it
  reports on: accounting, not enforcement.
* ``killed_reason="memory_limit"`` is inferred (a SIGKILL while the cgroup counted an OOM kill, or a
  non-zero exit with ``MemoryError`` on stderr);
  ``"cpu_limit"`` from SIGXCPU or a SIGKILL after ``cpu_s`` of CPU.
* The ``mechanisms`` list of every result says what was actually applied.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from megatron_kimi.rl import sandbox_cgroup
from megatron_kimi.rl.sandbox_bootstrap import BOOTSTRAP as _BOOTSTRAP
from megatron_kimi.rl.sandbox_bootstrap import PRELUDE as _PRELUDE

__all__ = [
    "SandboxResult",
    "run_sandboxed",
    "run_sandboxed_many",
    "available_backends",
    "cgroup_support",
    "BACKENDS",
]

BACKENDS = ("bwrap", "unshare", "none")
STATUSES = ("sandbox_error", "memory", "pids", "timeout", "cpu", "output", "file_size", "network", "fs",
            "exit", "ok")
_CGROUP_HEADROOM_MB = 64
_REASON_LIMIT = {"wall_timeout": "timeout", "cpu_limit": "cpu", "memory_limit": "memory",
                 "output_limit": "output", "file_size_limit": "file_size"}
_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # program's exit code; negative = killed by that signal; None = unknown
    timed_out: bool
    killed_reason: str | None  # wall_timeout | cpu_limit | memory_limit | output_limit | ...
    wall_s: float
    mechanisms: list[str] = field(default_factory=list)
    cpu_s: float | None = None
    error: str | None = None  # sandbox setup failure (not the program's fault)
    # how often each limit tripped: memory (OOM kills / MemoryError), pids (forks refused),
    # network / fs (attempts counted by the audit hook), timeout, cpu, output, file_size
    limits: dict[str, int] = field(default_factory=dict)
    # the first limit that tripped (in the order of STATUSES), else "ok" / "exit" (non-zero exit
    # or signal) / "sandbox_error"
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.killed_reason is None


# --------------------------------------------------------------------------------------------
# uid leases (root only)
# --------------------------------------------------------------------------------------------
def _id_range_mapped(path: str, first: int, last: int) -> bool:
    try:
        with open(path) as f:
            for line in f:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= first and last < inside + count:
                    return True
    except (OSError, ValueError):
        return True  # no map file: not in a user namespace
    return False


class _UidPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int | None] = {}
        self._ids: list[int] | None = None
        self._lockdir: str | None = None
        self._lockdir_ok = False

    def ids(self) -> list[int]:
        if self._ids is None:
            spec = os.environ.get("MEGATRON_KIMI_SANDBOX_UIDS")
            if spec:
                a, _, b = spec.partition("-")
                first, last = int(a), int(b or a)
            else:
                first, last = 2_100_000_000, 2_100_001_023
                if not (_id_range_mapped("/proc/self/uid_map", first, last)
                        and _id_range_mapped("/proc/self/gid_map", first, last)):
                    first = last = 65534
            self._ids = list(range(first, last + 1))
        return self._ids

    def _ensure_lockdir(self) -> bool:
        if self._lockdir is None:
            d = os.path.join(tempfile.gettempdir(), "megatron_kimi_sandbox_uid_locks")
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError:
                pass
            try:
                st = os.lstat(d)
                self._lockdir_ok = (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                                    and not (st.st_mode & 0o022))
            except OSError:
                self._lockdir_ok = False
            self._lockdir = d
        return self._lockdir_ok

    def acquire(self, wait_s: float = 60.0) -> tuple[int, bool]:
        """Returns (uid, exclusive)."""
        ids = self.ids()
        if len(ids) == 1:
            return ids[0], False
        cross_process = self._ensure_lockdir()
        deadline = time.monotonic() + wait_s
        while True:
            # a uid whose processes (e.g. zombies left to a slow PID 1) still exist is skipped
            busy = _uids_in_use(set(ids))
            for uid in ids:
                if uid in busy:
                    continue
                with self._lock:
                    if uid in self._held:
                        continue
                    self._held[uid] = None
                if not cross_process:
                    return uid, True
                fd = None
                try:
                    fd = os.open(os.path.join(self._lockdir, f"{uid}.lock"),
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    with self._lock:
                        self._held[uid] = fd
                    return uid, True
                except OSError:
                    if fd is not None:
                        os.close(fd)
                    with self._lock:
                        self._held.pop(uid, None)
            if time.monotonic() > deadline:
                raise RuntimeError("sandbox: no free uid in the pool (raise MEGATRON_KIMI_SANDBOX_UIDS)")
            time.sleep(0.05)

    def release(self, uid: int, exclusive: bool) -> None:
        if not exclusive:
            return
        with self._lock:
            fd = self._held.pop(uid, None)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


_UIDS = _UidPool()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _others_can_run(path: str) -> bool:
    """Whether an unrelated uid can execute ``path`` (every directory o+x, the file o+rx)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        if not (st.st_mode & stat.S_IXOTH and st.st_mode & stat.S_IROTH):
            return False
        d = os.path.dirname(real)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(d)
            if parent == d:
                return True
            d = parent
    except OSError:
        return False


_PYTHON_CACHE: dict[bool, str] = {}


def _pick_python(drop_uid: bool) -> str:
    if drop_uid in _PYTHON_CACHE:
        return _PYTHON_CACHE[drop_uid]
    env = os.environ.get("MEGATRON_KIMI_SANDBOX_PYTHON")
    cands = [env] if env else []
    cands += [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3",
              shutil.which("python3") or ""]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and (not drop_uid or _others_can_run(c)):
            _PYTHON_CACHE[drop_uid] = os.path.realpath(c)
            return _PYTHON_CACHE[drop_uid]
    raise RuntimeError("sandbox: no python3 interpreter usable by an unprivileged uid; "
                       "set MEGATRON_KIMI_SANDBOX_PYTHON")


def _count_own_tasks() -> int:
    me, n = os.getuid(), 0
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == me:
                        n += len(os.listdir(f"/proc/{name}/task"))
                except OSError:
                    pass
    except OSError:
        return 0
    return n


def _kill_uid(python: str, uid: int, gid: int) -> None:
    """kill(-1, SIGKILL) as ``uid``: every process of that uid dies in one system call."""
    code = ("import os\nos.setgroups([]); os.setgid(%d); os.setuid(%d)\n"
            "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n" % (gid, uid))
    try:
        subprocess.run([python, "-I", "-S", "-c", code], env={"PATH": _PATH}, timeout=10,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        pass


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (its pgid stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _parse_status(raw: bytes | bytearray) -> dict:
    """Merge the bootstrap's JSON status lines (errors collected in a list)."""
    out: dict = {"errors": []}
    for line in bytes(raw).decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "error" in rec:
            out["errors"].append(rec.pop("error"))
        out.update(rec)
    return out


def _uids_in_use(candidates: set[int]) -> set[int]:
    """Which of ``candidates`` own a process (zombies included: they count for RLIMIT_NPROC)."""
    busy: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return busy
    for name in names:
        if name.isdigit():
            try:
                u = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            if u in candidates:
                busy.add(u)
    return busy


_PROBE_LOCK = threading.Lock()
_PROBED: dict[str, tuple[bool, str]] = {}


def _probe(backend: str) -> tuple[bool, str]:
    with _PROBE_LOCK:
        if backend not in _PROBED:
            if backend == "bwrap" and shutil.which("bwrap") is None:
                _PROBED[backend] = (False, "bwrap not installed")
            elif backend == "unshare" and (os.geteuid() != 0 or shutil.which("unshare") is None):
                _PROBED[backend] = (False, "needs root and util-linux unshare")
            else:
                _PROBED[backend] = _trial_run(backend, use_cgroup=False)
        return _PROBED[backend]


def _trial_run(backend: str, use_cgroup: bool) -> tuple[bool, str]:
    """(works, why not): run ``print('ok')`` once in ``backend`` (with or without a cgroup)."""
    try:
        r = _run(backend, "print('ok')", "", timeout_s=30.0, cpu_s=10, memory_mb=512, max_procs=64,
                 max_output_bytes=4096, max_file_mb=1, max_open_files=64, disk_mb=4, network=False,
                 use_cgroup=use_cgroup)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here", with its reason
        return False, f"{backend}: trial run raised {e!r}"
    good = r.ok and r.stdout == "ok\n"
    return good, "" if good else f"{backend}: trial run failed: {r.error or r.stderr[-500:]!r}"


def cgroup_support() -> tuple[str | None, str]:
    """("v2" | "v1" | None, why not): whether runs get per-sandbox cgroups here (probed once)."""
    return sandbox_cgroup.probe()


_CG_LOCK = threading.Lock()
_CG_WORKS: dict[str, tuple[bool, str]] = {}


def _use_cgroup(cgroup: str, backend: str) -> bool:
    cgroup = os.environ.get("MEGATRON_KIMI_SANDBOX_CGROUP", "auto") if cgroup == "auto" else cgroup
    if cgroup not in ("auto", "off", "require"):
        raise ValueError(f"sandbox: cgroup must be 'auto', 'off' or 'require', got {cgroup!r}")
    if cgroup == "off":
        return False
    layout, why = sandbox_cgroup.probe()
    if layout is not None:
        with _CG_LOCK:  # joining can still fail inside a backend (say a user namespace): try once
            if backend not in _CG_WORKS:
                _CG_WORKS[backend] = _trial_run(backend, use_cgroup=True)
            good, trial_why = _CG_WORKS[backend]
        if not good:
            layout, why = None, trial_why
    if layout is None and cgroup == "require":
        raise RuntimeError(f"sandbox: cgroups required but unavailable: {why}")
    return layout is not None


def available_backends() -> list[str]:
    """Backends that work here, strongest first (probed once per process)."""
    return [b for b in BACKENDS if _probe(b)[0]]


def _resolve_backend(backend: str) -> str:
    backend = os.environ.get("MEGATRON_KIMI_SANDBOX_BACKEND", "") if backend == "auto" else backend
    if backend in ("", "auto"):
        for b in BACKENDS:
            if _probe(b)[0]:
                return b
        raise RuntimeError(f"sandbox: no backend works: {_PROBED}")
    if backend not in BACKENDS:
        raise ValueError(f"sandbox: unknown backend {backend!r}; choose from {BACKENDS}")
    good, why = _probe(backend)
    if not good:
        raise RuntimeError(f"sandbox backend {backend!r} unavailable: {why}")
    return backend


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def run_sandboxed(
    code: str,
    stdin: str = "",
    *,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    max_procs: int = 64,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    disk_mb: int = 64,
    network: bool = False,
    backend: str = "auto",
    cgroup: str = "auto",
) -> SandboxResult:
    """Run ``code`` with ``python3 -I -S`` in a sandbox, feeding ``stdin``; see the module doc.

    ``cgroup``: ``"auto"`` (per-sandbox memory/pids cgroup when :func:`cgroup_support` finds one,
    else the rlimit fallback; env ``MEGATRON_KIMI_SANDBOX_CGROUP`` overrides), ``"off"``, ``"require"``.
    """
    backend = _resolve_backend(backend)
    use_cgroup = _use_cgroup(cgroup, backend)
    return _run(backend, code, stdin, timeout_s=timeout_s, cpu_s=cpu_s,
                memory_mb=memory_mb, max_procs=max_procs, max_output_bytes=max_output_bytes,
                max_file_mb=max_file_mb, max_open_files=max_open_files, disk_mb=disk_mb,
                network=network, use_cgroup=use_cgroup)


def run_sandboxed_many(jobs: Sequence[tuple[str, str]], *, max_concurrency: int = 2,
                       **kwargs) -> list[SandboxResult]:
    """``run_sandboxed`` over ``[(code, stdin), ...]`` with at most ``max_concurrency`` at once."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(jobs))),
                            thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda j: run_sandboxed(j[0], j[1], **kwargs), jobs))


def _run(backend: str, code: str, stdin: str, *, timeout_s: float, cpu_s: int, memory_mb: int,
         max_procs: int, max_output_bytes: int, max_file_mb: int, max_open_files: int,
         disk_mb: int, network: bool, use_cgroup: bool) -> SandboxResult:
    is_root = os.geteuid() == 0
    python = _pick_python(drop_uid=is_root)
    mech: list[str] = [f"backend:{backend}", "tmpdir", "env-scrubbed", "python-isolated(-I -S)",
                       f"python:{python}", "new-session", "killpg-on-timeout"]
    uid = gid = None
    exclusive = False
    if is_root:
        uid, exclusive = _UIDS.acquire()
        gid = uid
        mech.append(f"uid:{uid}" + ("" if exclusive else "(shared)"))
    # with a cgroup, pids.max is the limit (and counts refusals); RLIMIT_NPROC only backs it up
    nproc = max_procs + (8 if use_cgroup else 0)
    if not is_root and backend != "bwrap":
        nproc = _count_own_tasks() + nproc
        mech.append("nproc:relative-to-user(best-effort)")
    rlimits = [
        ("RLIMIT_CPU", int(cpu_s), int(cpu_s) + 1),
        ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
        ("RLIMIT_NPROC", nproc, nproc),
        ("RLIMIT_FSIZE", max_file_mb << 20, max_file_mb << 20),
        ("RLIMIT_NOFILE", max_open_files, max_open_files),
        ("RLIMIT_CORE", 0, 0),
    ]
    mech.append("rlimits:cpu,as,nproc,fsize,nofile,core")

    ctl = tempfile.mkdtemp(prefix="mk_sbx_ctl_")  # root/user-only: program source and stdin
    work = tempfile.mkdtemp(prefix="mk_sbx_")
    status_r = status_w = audit_r = audit_w = None
    cg: sandbox_cgroup.RunCgroup | None = None
    cg_fds: list[int] = []
    proc = None
    t0 = time.monotonic()
    try:
        if use_cgroup:
            # the budget is for the whole sandbox: every process, page cache and tmpfs files; the
            # headroom keeps a single process (RLIMIT_AS = memory_mb, address space >= resident)
            # failing fast with MemoryError instead of thrashing the interpreter's own file pages
            # out of the cgroup just below the limit
            cg = sandbox_cgroup.RunCgroup((memory_mb + _CGROUP_HEADROOM_MB) << 20, max_procs)
            cg_fds = cg.open_procs_fds()
            mech += cg.mechanisms
        else:
            mech.append("memory:per-process-RLIMIT_AS(no-cgroup)")
        code_path, stdin_path = os.path.join(ctl, "main.py"), os.path.join(ctl, "stdin")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        if uid is not None:
            os.chown(work, uid, gid)
            os.chmod(work, 0o700)
        env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        status_r, status_w = os.pipe()
        audit_r, audit_w = os.pipe()
        cfg = {
            "status_fd": status_w, "workdir": work, "uid": uid, "gid": gid, "python": python,
            "code_path": code_path, "stdin_path": stdin_path, "rlimits": rlimits, "env": env,
            "remount": backend == "unshare", "chown_workdir": backend == "bwrap",
            "disk_bytes": disk_mb << 20, "reap": backend == "none",
            "cgroup_fds": cg_fds, "audit_fd": audit_w, "prelude": _PRELUDE,
        }
        boot = [python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)]
        if backend == "bwrap":
            wrap = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
            if cg is None:
                # a cgroup namespace rooted at the trainer's cgroup could forbid joining the run's
                # cgroup when the trainer sits in a leaf beside it (v2); /sys is read-only anyway
                wrap.append("--unshare-cgroup-try")
            if not is_root:
                wrap.append("--unshare-user")
            if not network:
                wrap.append("--unshare-net")
            wrap += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                     "--size", str(disk_mb << 20), "--tmpfs", work, "--chdir", "/", "--"]
            mech += ["pidns", "ipcns", "utsns", "mountns:ro-root", f"tmpfs-workdir:{disk_mb}MB"]
            if not is_root:
                mech.append("userns")
        elif backend == "unshare":
            wrap = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                    "--kill-child", "--mount-proc", "--ipc", "--uts"]
            if not network:
                wrap.append("--net")
            wrap.append("--")
            mech += ["pidns", "ipcns", "utsns", "mountns:ro-remount", f"tmpfs-workdir:{disk_mb}MB"]
        else:
            wrap = []
            mech += ["no-namespaces(best-effort)", "subreaper",
                     "kill-uid-after" if is_root else "kill-children-after(best-effort)"]
        mech.append("network:allowed" if network else
                    ("netns" if backend != "none" else "network:NOT-isolated"))
        proc = subprocess.Popen(
            wrap + boot, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=work, env=env, start_new_session=True, pass_fds=(status_w, audit_w, *cg_fds),
            close_fds=True)
        for fd in [status_w, audit_w, *cg_fds]:
            os.close(fd)
        status_w = audit_w = None
        cg_fds = []

        timed_out = False
        killed_reason: str | None = None
        bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray(), "audit": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(status_r, selectors.EVENT_READ, "status")
        sel.register(audit_r, selectors.EVENT_READ, "audit")
        deadline = t0 + timeout_s
        exited_at: float | None = None
        killed = False

        def kill() -> None:
            nonlocal killed
            if killed:
                return
            killed = True
            # the whole sandbox at once, whatever process group or session it made; nothing can
            # leave its cgroup, so an empty one means the program is gone
            cg_empty = cg is not None and cg.kill()
            if backend == "none" and not _exited(proc.pid):
                # Kill the program but let the bootstrap (a subreaper) sweep and reap the rest:
                # orphans of a killed bootstrap would be left to PID 1 as zombies that still count
                # against the uid's RLIMIT_NPROC.
                if cg_empty:
                    pass
                elif uid is not None:
                    _kill_uid(python, uid, gid)
                else:
                    st = _parse_status(bufs["status"])
                    if "child_pid" in st and "status" not in st:
                        try:
                            os.killpg(st["child_pid"], signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                grace = time.monotonic() + 1.0
                while time.monotonic() < grace and not _exited(proc.pid):
                    time.sleep(0.01)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leader not reaped yet: the pgid is still ours
            except (ProcessLookupError, PermissionError):
                pass

        try:
            while sel.get_map():
                now = time.monotonic()
                if exited_at is None and _exited(proc.pid):
                    exited_at = now
                if exited_at is not None and now > exited_at + 1.0:
                    kill()  # something outlived the bootstrap and still holds a pipe
                    break
                if not killed and now >= deadline:
                    timed_out, killed_reason = True, "wall_timeout"
                    kill()
                    exited_at = exited_at or now
                events = sel.select(timeout=max(0.0, min(0.05, deadline - now)) if not killed else 0.05)
                for key, _ in events:
                    try:
                        data = os.read(key.fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    buf = bufs[key.data]
                    if key.data == "audit":  # written by the program: bounded, never fatal
                        buf += data[: max(0, 65536 - len(buf))]
                    elif key.data != "status" and len(buf) + len(data) > max_output_bytes:
                        buf += data[: max_output_bytes - len(buf)]
                        if killed_reason is None:
                            killed_reason = "output_limit"
                        kill()
                        exited_at = exited_at or time.monotonic()
                    else:
                        buf += data
        finally:
            sel.close()
            if proc.poll() is None:
                kill()
                proc.wait()
        wall = time.monotonic() - t0

        st = _parse_status(bufs["status"])
        status, cpu, errors = st.get("status"), st.get("cpu"), st.get("errors", [])
        if st.get("no_new_privs"):
            mech.append("no_new_privs")
        stderr = bytes(bufs["stderr"]).decode("utf-8", "replace")
        if status is not None:
            exit_code: int | None = os.waitstatus_to_exitcode(status)
        elif timed_out or killed:
            exit_code = None
        else:
            exit_code = proc.returncode
        error = "; ".join(errors) or None
        limits: dict[str, int] = {}
        for line in bytes(bufs["audit"]).decode("utf-8", "replace").splitlines():
            kind = line.partition("\t")[0]
            if kind in ("network", "fs", "pids"):
                limits[kind] = limits.get(kind, 0) + 1
        if cg is not None:
            cg.kill()
            limits.update({k: v for k, v in cg.counts().items() if v})
        # uncaught MemoryErrors (RLIMIT_AS) of any of the run's processes: their tracebacks' last line
        n_memerr = sum(ln == "MemoryError" or ln.startswith("MemoryError:") for ln in stderr.splitlines())
        if n_memerr:
            limits["memory"] = limits.get("memory", 0) + n_memerr
        if killed_reason is None:
            sig = -exit_code if exit_code is not None and exit_code < 0 else None
            if error and status is None:
                killed_reason = "sandbox_error"
            elif sig == signal.SIGKILL and limits.get("memory"):
                killed_reason = "memory_limit"  # the cgroup's OOM killer
            elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None
                                           and cpu >= cpu_s - 0.1):
                killed_reason = "cpu_limit"
            elif sig == signal.SIGXFSZ:
                killed_reason = "file_size_limit"
            elif sig is not None:
                try:
                    killed_reason = f"signal:{signal.Signals(sig).name}"
                except ValueError:
                    killed_reason = f"signal:{sig}"
            elif exit_code not in (0, None) and "MemoryError" in stderr[-4000:]:
                killed_reason = "memory_limit"
        if killed_reason in _REASON_LIMIT:
            lim = _REASON_LIMIT[killed_reason]
            limits[lim] = max(1, limits.get(lim, 0))
        if killed_reason == "sandbox_error":
            run_status = "sandbox_error"
        else:
            run_status = next((k for k in STATUSES if limits.get(k)), "exit" if exit_code != 0 else "ok")
        return SandboxResult(
            stdout=bytes(bufs["stdout"]).decode("utf-8", "replace"), stderr=stderr,
            exit_code=exit_code, timed_out=timed_out, killed_reason=killed_reason, wall_s=wall,
            mechanisms=mech, cpu_s=cpu, error=error, limits=limits, status=run_status)
    finally:
        for fd in (status_r, status_w, audit_r, audit_w, *cg_fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc is not None:
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()
        if cg is not None and not cg.remove():
            # a process that would not die keeps its uid out of the pool (see _uids_in_use)
            mech.append("cgroup:NOT-EMPTY-after-kill")
        shutil.rmtree(ctl, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid, exclusive)
