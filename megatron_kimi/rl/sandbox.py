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
program could tamper with) that finishes the setup (as root when the trainer is root), forks, and in the child sets the
rlimits, drops privileges and ``execve``\\ s the program; the parent half waits for the program and
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
* Memory: ``RLIMIT_AS`` limits address space per process, not the sum over ``max_procs``
  processes; tmpfs pages (``disk_mb``) are RAM too.  No cgroups are used.
* ``killed_reason="memory_limit"`` is inferred (a non-zero exit with ``MemoryError`` on stderr);
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

__all__ = [
    "SandboxResult",
    "run_sandboxed",
    "run_sandboxed_many",
    "available_backends",
    "BACKENDS",
]

BACKENDS = ("bwrap", "unshare", "none")
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

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.killed_reason is None


# --------------------------------------------------------------------------------------------
# The bootstrap: runs inside the wrapper, as root when the trainer is root.
# --------------------------------------------------------------------------------------------
_BOOTSTRAP = r"""
import json, os, re, sys
cfg = json.loads(sys.argv[1])
sfd = cfg["status_fd"]
def report(**kw):
    try:
        os.write(sfd, (json.dumps(kw) + "\n").encode())
    except OSError:
        pass
W, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]
try:
    if cfg["remount"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        def mount(src, tgt, fstype, flags, data):
            enc = lambda s: None if s is None else os.fsencode(s)
            if libc.mount(enc(src), enc(tgt), enc(fstype), flags, enc(data)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), tgt)
        keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
        points = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
                points.append((mp, parts[5].split(",")))
        n_ro = 0
        for mp, opts in points:
            if mp == "/proc" or mp.startswith("/proc/") or mp in ("/dev", "/dev/pts"):
                continue
            flags = 4096 | 32 | 1  # MS_BIND | MS_REMOUNT | MS_RDONLY
            for o in opts:
                flags |= keep.get(o, 0)
            try:
                mount(None, mp, None, flags, None)
                n_ro += 1
            except OSError:
                if mp == "/":
                    raise
        owner = "" if uid is None else ",uid=%d,gid=%d" % (uid, gid)
        mount("tmpfs", W, "tmpfs", 2 | 4, "size=%d,mode=0700%s" % (cfg["disk_bytes"], owner))
        report(remounted_ro=n_ro)
    elif cfg["chown_workdir"] and uid is not None:
        os.chown(W, uid, gid)
        os.chmod(W, 0o700)
    with open(cfg["code_path"], "rb") as f:
        code = f.read()
    os.set_inheritable(sfd, False)
except BaseException as e:
    report(error="bootstrap: %r" % (e,))
    os._exit(125)
if cfg["reap"]:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass
pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        fd = os.open(cfg["stdin_path"], os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        import resource
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        try:
            import ctypes
            if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
                report(no_new_privs=True)
        except Exception:
            pass
        os.chdir(W)
        with open("main.py", "wb") as f:
            f.write(code)
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "main.py"], cfg["env"])
    except BaseException as e:
        report(error="child setup: %r" % (e,))
        os._exit(126)
report(child_pid=pid)
while True:
    try:
        _, status, ru = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
report(status=status, cpu=ru.ru_utime + ru.ru_stime, maxrss_kb=ru.ru_maxrss)
if cfg["reap"]:  # no PID namespace: kill and reap whatever the program left behind
    import time
    if uid is not None:
        if os.fork() == 0:
            try:
                os.setgroups([]); os.setgid(gid); os.setuid(uid)
                os.kill(-1, 9)  # every process of the sandbox uid, in one system call
            except BaseException:
                pass
            os._exit(0)
    me, deadline = str(os.getpid()), time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if uid is None:  # same uid as the trainer: kill only our (adopted) children
            for d in os.listdir("/proc"):
                try:
                    with open("/proc/%s/stat" % d) as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            os.kill(int(d), 9)
                except (OSError, IndexError, ValueError):
                    pass
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.005)
        except ChildProcessError:
            break
os._exit(0)
"""


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
                try:
                    r = _run(backend, "print('ok')", "", timeout_s=30.0, cpu_s=10, memory_mb=512,
                             max_procs=64, max_output_bytes=4096, max_file_mb=1, max_open_files=64,
                             disk_mb=4, network=False)
                    good = r.ok and r.stdout == "ok\n"
                    _PROBED[backend] = (good, "" if good else f"probe failed: {r.error or r.stderr[-500:]!r}")
                except Exception as e:  # noqa: BLE001
                    _PROBED[backend] = (False, f"probe raised {e!r}")
        return _PROBED[backend]


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
) -> SandboxResult:
    """Run ``code`` with ``python3 -I -S`` in a sandbox, feeding ``stdin``; see the module doc."""
    return _run(_resolve_backend(backend), code, stdin, timeout_s=timeout_s, cpu_s=cpu_s,
                memory_mb=memory_mb, max_procs=max_procs, max_output_bytes=max_output_bytes,
                max_file_mb=max_file_mb, max_open_files=max_open_files, disk_mb=disk_mb,
                network=network)


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
         disk_mb: int, network: bool) -> SandboxResult:
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
    nproc = max_procs
    if not is_root and backend != "bwrap":
        nproc = _count_own_tasks() + max_procs
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
    status_r = status_w = None
    proc = None
    t0 = time.monotonic()
    try:
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
        cfg = {
            "status_fd": status_w, "workdir": work, "uid": uid, "gid": gid, "python": python,
            "code_path": code_path, "stdin_path": stdin_path, "rlimits": rlimits, "env": env,
            "remount": backend == "unshare", "chown_workdir": backend == "bwrap",
            "disk_bytes": disk_mb << 20, "reap": backend == "none",
        }
        boot = [python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)]
        if backend == "bwrap":
            wrap = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                    "--unshare-cgroup-try"]
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
            cwd=work, env=env, start_new_session=True, pass_fds=(status_w,), close_fds=True)
        os.close(status_w)
        status_w = None

        timed_out = False
        killed_reason: str | None = None
        bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(status_r, selectors.EVENT_READ, "status")
        deadline = t0 + timeout_s
        exited_at: float | None = None
        killed = False

        def kill() -> None:
            nonlocal killed
            if killed:
                return
            killed = True
            if backend == "none" and not _exited(proc.pid):
                # Kill the program but let the bootstrap (a subreaper) sweep and reap the rest:
                # orphans of a killed bootstrap would be left to PID 1 as zombies that still count
                # against the uid's RLIMIT_NPROC.
                if uid is not None:
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
                    if key.data != "status" and len(buf) + len(data) > max_output_bytes:
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
        if killed_reason is None:
            sig = -exit_code if exit_code is not None and exit_code < 0 else None
            if error and status is None:
                killed_reason = "sandbox_error"
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
        return SandboxResult(
            stdout=bytes(bufs["stdout"]).decode("utf-8", "replace"), stderr=stderr,
            exit_code=exit_code, timed_out=timed_out, killed_reason=killed_reason, wall_s=wall,
            mechanisms=mech, cpu_s=cpu, error=error)
    finally:
        for fd in (status_r, status_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc is not None:
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()
        shutil.rmtree(ctl, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid, exclusive)
