"""Per-sandbox cgroups: the cgroup v2 file protocol on a fake tree (this CI machine is a v1/v2 hybrid
whose v2 hierarchy has no memory/pids controllers; tests/rl/test_sandbox.py runs the real thing on
whatever layout the machine has)."""

from __future__ import annotations

import os

import pytest

from megatron_kimi.rl import sandbox_cgroup as sc


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    """A cgroup2 tree: the trainer in /svc/app, memory and pids delegated to its children."""
    own = tmp_path / "svc" / "app"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(sc, "_mounts", lambda: (str(tmp_path), {}))
    monkeypatch.setattr(sc, "_own_paths", lambda: {"": "/svc/app"})
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777):  # the kernel populates a new cgroup's control files
        real_mkdir(path, mode)
        for f in ("cgroup.subtree_control", "cgroup.procs", "cgroup.kill", "memory.swap.max"):
            open(os.path.join(path, f), "w").close()

    def rmdir(path):  # ... and removes them with it
        if str(path).startswith(str(tmp_path)):
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))
        real_rmdir(path)

    real_rmdir = os.rmdir
    monkeypatch.setattr(sc.os, "mkdir", mkdir)  # (sc.os is os: only the code under test makes dirs here)
    monkeypatch.setattr(sc.os, "rmdir", rmdir)
    monkeypatch.setattr(sc, "_PROBED", [])
    return own


def test_v2_parent_limits_counts_and_removal(fake_v2):
    assert sc.probe() == ("v2", "")
    base = fake_v2 / "megatron_kimi_sandbox"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not [d for d in os.listdir(base) if d.startswith("run_")]  # the probe's trial cgroup is gone
    cg = sc.RunCgroup(192 << 20, 16)
    run = base / os.path.basename(cg.dirs["v2"])
    assert (run / "memory.max").read_text() == str(192 << 20)
    assert (run / "memory.swap.max").read_text() == "0"
    assert (run / "pids.max").read_text() == "16"
    assert cg.mechanisms == ["cgroup-v2:memory.max=192MB,pids.max=16,cgroup.kill"]
    (run / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    (run / "pids.events").write_text("max 41\n")
    assert cg.counts() == {"memory": 2, "pids": 41}
    fds = cg.open_procs_fds()
    assert len(fds) == 1
    for fd in fds:
        os.close(fd)
    (run / "cgroup.procs").write_text("")  # empty: kill() has nothing to do
    assert cg.remove() and not run.exists()


def test_v2_without_delegation_and_other_processes_falls_back(fake_v2, monkeypatch):
    (fake_v2 / "cgroup.subtree_control").write_text("")
    (fake_v2 / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")

    def busy(path, text):
        raise OSError(16, "Device or resource busy")  # "no internal processes"

    monkeypatch.setattr(sc, "_write", busy)
    layout, why = sc.probe()
    assert layout is None and "holds other processes" in why
    assert not (fake_v2 / "megatron_kimi_trainer").exists()  # nobody else's process was moved


def test_v2_lone_trainer_moves_into_a_leaf_first(fake_v2, monkeypatch):
    """'No internal processes': the trainer leaves its cgroup before controllers are enabled there."""
    (fake_v2 / "cgroup.subtree_control").write_text("")
    calls = []
    real_write = sc._write

    def write(path, text):
        calls.append((os.path.relpath(path, fake_v2), text))
        if path == str(fake_v2 / "cgroup.subtree_control") and ("megatron_kimi_trainer/cgroup.procs",
                                                                  str(os.getpid())) not in calls:
            raise OSError(16, "Device or resource busy")
        real_write(path, text)

    monkeypatch.setattr(sc, "_write", write)
    assert sc.probe()[0] == "v2"
    assert calls[:3] == [("cgroup.subtree_control", "+memory +pids"),
                         ("megatron_kimi_trainer/cgroup.procs", str(os.getpid())),
                         ("cgroup.subtree_control", "+memory +pids")]


def test_real_cgroup_kill_loop_without_cgroup_kill(monkeypatch):
    """Without cgroup.kill (v1 only, or v2 before Linux 5.14) kill() SIGKILLs the listed pids until
    none is left, even when they keep forking (pids.max bounds them)."""
    if sc.probe()[0] is None:
        pytest.skip(f"no writable cgroups here: {sc.probe()[1]}")
    layout, bases, why = sc._PROBED[0]
    monkeypatch.setattr(sc, "_PROBED", [(layout, {k: v for k, v in bases.items() if k != "kill"}, why)])
    monkeypatch.setattr(sc.RunCgroup, "_kill_file", lambda self: None)
    cg = sc.RunCgroup(128 << 20, 8)
    assert cg.mechanisms[0].endswith(",kill-loop")
    fds = cg.open_procs_fds()
    pid = os.fork()
    if pid == 0:  # joins, then forks forever (bounded by pids.max 8 and RLIMIT_CPU)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
            for fd in fds:
                os.write(fd, b"0")
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    import threading
    import time

    reaper = threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True)  # no zombie of ours in there
    reaper.start()
    try:
        deadline = time.monotonic() + 5
        while (len(cg.pids()) < 8 or not cg.counts()["pids"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(cg.pids()) == 8 and cg.counts()["pids"] >= 1
    finally:
        assert cg.kill(wait_s=10) and cg.pids() == []
        reaper.join(5)
        assert cg.remove()
