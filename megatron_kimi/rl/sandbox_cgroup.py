"""Per-sandbox cgroups: one memory and one process budget over *all* processes of a sandbox run.

Used by :mod:`megatron_kimi.rl.sandbox`.  Each run gets its own cgroup (a leaf below a dedicated
``megatron_kimi_sandbox`` parent) with

* memory: ``memory.max`` + ``memory.swap.max = 0`` (v2) or ``memory.limit_in_bytes`` +
  ``memory.memsw.limit_in_bytes`` (v1); the kernel's OOM killer then kills inside that cgroup only.
  The budget is the sum over the run's processes, page cache and tmpfs files included.
* processes: ``pids.max`` (threads count too, as for ``RLIMIT_NPROC``).
* kill: ``cgroup.kill`` (v2, Linux >= 5.14; on a hybrid v1 host the unified hierarchy has it even
  without controllers), else ``pids.max = 0`` (no more forks) and SIGKILL to every pid listed until
  the cgroup is empty.
* counts: ``memory.events``/``memory.oom_control`` ``oom_kill`` and ``pids.events`` ``max`` (forks
  refused) say which limit tripped and how often.

Layouts found (probed once per process, :func:`probe`):

``"v2"``      a cgroup2 mount with the ``memory`` and ``pids`` controllers.  The parent is created
              below the trainer's own cgroup; the v2 "no internal processes" rule means the trainer's
              cgroup must already delegate both controllers (``cgroup.subtree_control``), or be the
              root, or hold only this process, which is then moved into a ``megatron_kimi_trainer``
              leaf first.
``"v1"``      cgroup v1 ``memory`` and ``pids`` hierarchies (the parent below the trainer's own
              cgroup in each; v1 has no internal-process rule), plus the unified v2 hierarchy for
              ``cgroup.kill`` when the host is hybrid.
``None``      neither is writable (not root and nothing delegated, a read-only ``/sys/fs/cgroup``,
              no controllers): the sandbox falls back to per-process rlimits (its module doc).

A run's processes join by writing ``0`` ("myself") into file descriptors of the ``cgroup.procs``
files that the trainer opened; the sandboxed program's first process does that before it drops
privileges, so nothing it starts can be outside.  The descriptors are opened before any mount
namespace remounts ``/sys`` read-only.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

__all__ = ["probe", "RunCgroup", "CgroupUnavailable"]

_PARENT = "megatron_kimi_sandbox"


class CgroupUnavailable(RuntimeError):
    pass


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kv(path: str) -> dict[str, int]:
    out = {}
    try:
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _mounts() -> tuple[str | None, dict[str, tuple[str, str]]]:
    """(cgroup2 mount point, {v1 controller: (mount point, mount root)})."""
    v2, v1 = None, {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            parts, fs = pre.split(), post.split()
            if len(parts) < 5 or len(fs) < 3:
                continue
            if fs[0] == "cgroup2" and v2 is None and parts[3] == "/":
                v2 = parts[4]
            elif fs[0] == "cgroup":
                for opt in fs[2].split(","):
                    if opt in ("memory", "pids"):
                        v1[opt] = (parts[4], parts[3])
    return v2, v1


def _own_paths() -> dict[str, str]:
    """{"": v2 path, controller: v1 path} of this process."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _join(mount: str, root: str, own: str) -> str:
    if root != "/" and own.startswith(root):
        own = own[len(root):] or "/"
    return os.path.join(mount, own.lstrip("/"))


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass


def _setup_v2(mount: str) -> dict[str, str]:
    own = _join(mount, "/", _own_paths().get("", "/"))
    need = {"memory", "pids"}
    if not need <= set(_read(os.path.join(own, "cgroup.controllers")).split()):
        raise CgroupUnavailable(f"cgroup v2 at {own} lacks the memory/pids controllers")
    if not need <= set(_read(os.path.join(own, "cgroup.subtree_control")).split()):
        try:
            _write(os.path.join(own, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            # "no internal processes": move this process into a leaf first, if it is alone here
            procs = _read(os.path.join(own, "cgroup.procs")).split()
            if procs != [str(os.getpid())]:
                raise CgroupUnavailable(f"cgroup v2 {own} holds other processes; cannot enable "
                                        "memory/pids for children") from None
            leaf = os.path.join(own, "megatron_kimi_trainer")
            _mkdir(leaf)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
            _write(os.path.join(own, "cgroup.subtree_control"), "+memory +pids")
    base = os.path.join(own, _PARENT)
    _mkdir(base)
    if not need <= set(_read(os.path.join(base, "cgroup.subtree_control")).split()):
        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
    return {"v2": base}


def _setup_v1(v1: dict[str, tuple[str, str]], v2_mount: str | None) -> dict[str, str]:
    if not {"memory", "pids"} <= set(v1):
        raise CgroupUnavailable("no cgroup v1 memory and pids hierarchies")
    own = _own_paths()
    bases = {}
    for c in ("memory", "pids"):
        mount, root = v1[c]
        bases[c] = os.path.join(_join(mount, root, own.get(c, "/")), _PARENT)
        _mkdir(bases[c])
    if v2_mount is not None:  # hybrid host: the unified tree gives cgroup.kill and populated
        try:
            kill_base = os.path.join(_join(v2_mount, "/", own.get("", "/")), _PARENT)
            _mkdir(kill_base)
            if os.path.exists(os.path.join(kill_base, "cgroup.kill")):
                bases["kill"] = kill_base
        except OSError:
            pass
    return bases


def _sweep_stale(bases: dict[str, str]) -> None:
    """Remove the empty run cgroups of trainers that died before removing them."""
    for base in bases.values():
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            parts = name.split("_")
            if len(parts) != 3 or parts[0] != "run" or not parts[1].isdigit():
                continue
            if os.path.exists(f"/proc/{parts[1]}"):
                continue  # that trainer still runs (or its pid was reused: leave it)
            try:
                os.rmdir(os.path.join(base, name))
            except OSError:
                pass  # not empty: a leftover still runs there; kill it by hand


_PROBE_LOCK = threading.Lock()
_PROBED: list = []  # [(layout | None, bases, reason)]


def probe() -> tuple[str | None, str]:
    """("v2" | "v1" | None, why not); creates the dedicated parent cgroups once."""
    with _PROBE_LOCK:
        if not _PROBED:
            layout, bases, why = None, {}, ""
            try:
                v2, v1 = _mounts()
                errors = []
                if v2 is not None:
                    try:
                        bases, layout = _setup_v2(v2), "v2"
                    except (OSError, CgroupUnavailable) as e:
                        errors.append(f"v2: {e}")
                if layout is None:
                    try:
                        bases, layout = _setup_v1(v1, v2), "v1"
                    except (OSError, CgroupUnavailable) as e:
                        errors.append(f"v1: {e}")
                why = "; ".join(errors)
            except OSError as e:
                why = f"cannot read cgroup mounts: {e}"
            if layout is not None:  # check that a leaf with limits can really be made
                _sweep_stale(bases)
                _PROBED.append((layout, bases, ""))
                try:
                    RunCgroup(64 << 20, 8).remove()
                except (OSError, CgroupUnavailable) as e:
                    _PROBED[0] = (None, {}, f"{layout}: cannot create a run cgroup: {e}")
            else:
                _PROBED.append((None, {}, why))
        return _PROBED[0][0], _PROBED[0][2]


_SEQ = itertools.count()


class RunCgroup:
    """The cgroup(s) of one sandbox run; :func:`probe` must have found a layout."""

    def __init__(self, memory_bytes: int, max_pids: int) -> None:
        layout, bases, why = _PROBED[0]
        if layout is None:
            raise CgroupUnavailable(why)
        self.layout = layout
        name = f"run_{os.getpid()}_{next(_SEQ)}"
        self.dirs = {k: os.path.join(b, name) for k, b in bases.items()}
        made = []
        try:
            for d in self.dirs.values():
                os.mkdir(d, 0o755)
                made.append(d)
            if layout == "v2":
                d = self.dirs["v2"]
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
                _write(os.path.join(d, "pids.max"), str(max_pids))
            else:
                m = self.dirs["memory"]
                _write(os.path.join(m, "memory.limit_in_bytes"), str(memory_bytes))
                if os.path.exists(os.path.join(m, "memory.memsw.limit_in_bytes")):
                    _write(os.path.join(m, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                _write(os.path.join(self.dirs["pids"], "pids.max"), str(max_pids))
        except OSError:
            for d in reversed(made):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise
        self.mechanisms = [f"cgroup-{layout}:memory.max={memory_bytes >> 20}MB,pids.max={max_pids}"
                           + (",cgroup.kill" if self._kill_file() else ",kill-loop")]

    def _kill_file(self) -> str | None:
        d = self.dirs.get("v2") or self.dirs.get("kill")
        return os.path.join(d, "cgroup.kill") if d and os.path.exists(os.path.join(d, "cgroup.kill")) else None

    def open_procs_fds(self) -> list[int]:
        """Write-only fds of every ``cgroup.procs``; writing ``b"0"`` to each moves the writer in."""
        return [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                for d in self.dirs.values()]

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            try:
                out.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except (OSError, ValueError):
                pass
        return sorted(out)

    def counts(self) -> dict[str, int]:
        """{"memory": OOM kills, "pids": forks refused by pids.max}."""
        if self.layout == "v2":
            mem = _kv(os.path.join(self.dirs["v2"], "memory.events")).get("oom_kill", 0)
            pids = _kv(os.path.join(self.dirs["v2"], "pids.events")).get("max", 0)
        else:
            mem = _kv(os.path.join(self.dirs["memory"], "memory.oom_control")).get("oom_kill", 0)
            pids = _kv(os.path.join(self.dirs["pids"], "pids.events")).get("max", 0)
        return {"memory": mem, "pids": pids}

    def kill(self, wait_s: float = 2.0) -> bool:
        """SIGKILL everything in the cgroup; True once it is empty."""
        kf = self._kill_file()
        if kf is None:
            try:  # no fork can succeed any more, so one sweep over the listed pids catches all
                _write(os.path.join(self.dirs.get("pids") or self.dirs["v2"], "pids.max"), "0")
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while True:
            left = self.pids()
            if not left:
                return True
            if kf is not None:
                try:
                    _write(kf, "1")
                except OSError:
                    kf = None
            if kf is None:
                for p in left:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def remove(self) -> bool:
        """Kill what is left and remove the cgroup(s); False if something would not go."""
        empty = self.kill(wait_s=5.0)
        ok = empty
        for d in self.dirs.values():
            for _ in range(100):  # a just-killed task can keep the cgroup busy for a moment
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                ok = False
        return ok
