"""The code-reward sandbox: normal programs work, and each limit really bites (on every backend
that works on this machine).  Limits are kept small so that a failing test cannot hurt the host."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from megatron_kimi.rl import sandbox as sb
from megatron_kimi.rl.sandbox import available_backends, run_sandboxed, run_sandboxed_many

REPO = Path(__file__).resolve().parents[2]
BACKENDS = available_backends()
IS_ROOT = os.geteuid() == 0
NS_BACKENDS = [b for b in BACKENDS if b != "none"]
CGROUP = sb.cgroup_support()[0] is not None
# every backend with the per-sandbox cgroup (where this machine has one) and with the rlimit fallback
MODES = [(b, c) for b in BACKENDS for c in (["require"] if CGROUP else []) + ["off"]]
if CGROUP:  # the one-time trial of joining a cgroup in each backend, outside the tests' timings
    for _b in BACKENDS:
        sb._use_cgroup("auto", _b)

pytestmark = pytest.mark.timeout(120)


def _pool_uids() -> set[int]:
    return set(sb._UIDS.ids()) if IS_ROOT else set()


def _procs_of(uids: set[int]) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in uids:
                    n += 1
            except OSError:
                pass
    return n


def _proc_list(uids: set[int]) -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid in uids:
                with open(f"/proc/{name}/stat") as f:
                    out.append(f.read()[:80])
        except OSError:
            pass
    return out


def _host_procs() -> int:
    return sum(1 for n in os.listdir("/proc") if n.isdigit())


def _run_cgroups() -> list[str]:
    """Run cgroups of this process still present under the dedicated parents."""
    if not CGROUP:
        return []
    _layout, bases, _why = sb.sandbox_cgroup._PROBED[0]
    return [d for b in bases.values() for d in os.listdir(b) if d.startswith(f"run_{os.getpid()}_")]


def _assert_host_unaffected(r) -> None:
    """Nothing of the run is left, and this process can still fork and allocate."""
    assert "cgroup:NOT-EMPTY-after-kill" not in r.mechanisms
    uids = _pool_uids()
    deadline = time.monotonic() + 10  # generous: the shared CI machine can be heavily loaded
    while uids and _procs_of(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs_of(uids) == 0, f"sandbox processes survived the run: {_proc_list(uids)}"
    assert _run_cgroups() == []
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
    block = bytearray(b"\1") * (64 << 20)
    assert block[-1] == 1 and len(block) == 64 << 20


def test_some_backend_works_and_reports_mechanisms():
    assert BACKENDS, sb._PROBED
    r = run_sandboxed("print('hi')", "")
    assert r.ok and r.stdout == "hi\n"
    assert r.mechanisms[0] == f"backend:{BACKENDS[0]}"
    assert "rlimits:cpu,as,nproc,fsize,nofile,core" in r.mechanisms
    if IS_ROOT:
        assert any(m.startswith("uid:") for m in r.mechanisms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdin_stdout_exit_code_and_env(backend):
    code = (
        "import os, sys\n"
        "data = sys.stdin.read()\n"
        "nums = list(map(int, data.split()))\n"
        "print(sum(nums))\n"
        "print(sorted(os.environ), file=sys.stderr)\n"
        "print(os.getcwd())\n"
        "sys.exit(3)\n"
    )
    r = run_sandboxed(code, "1 2 3\n4\n", backend=backend)
    lines = r.stdout.splitlines()
    assert lines[0] == "10"
    assert r.exit_code == 3 and not r.timed_out and r.killed_reason is None and r.error is None
    env_keys = eval(r.stderr.strip().splitlines()[-1])  # noqa: S307 - our own program's output
    assert set(env_keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}
    assert not os.path.exists(lines[1]), "work dir must be removed afterwards"


@pytest.mark.parametrize("backend, cgroup", MODES)
def test_infinite_loop_is_killed(backend, cgroup):
    t = time.monotonic()
    r = run_sandboxed("while True:\n    pass\n", "", timeout_s=1.5, cpu_s=1, backend=backend, cgroup=cgroup)
    assert time.monotonic() - t < 1.5 + 2
    assert r.exit_code != 0 and r.killed_reason in ("cpu_limit", "wall_timeout")
    assert r.status in ("cpu", "timeout") and r.limits[r.status] == 1
    _assert_host_unaffected(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleeping_program_hits_wall_timeout(backend):
    t = time.monotonic()
    r = run_sandboxed("import time\ntime.sleep(60)\n", "", timeout_s=1.0, backend=backend)
    assert time.monotonic() - t < 1.0 + 2
    assert r.timed_out and r.killed_reason == "wall_timeout" and not r.ok


@pytest.mark.parametrize("backend, cgroup", MODES)
def test_fork_bomb_is_contained_and_counted(backend, cgroup):
    uids = _pool_uids()
    before = _host_procs()
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _procs_of(uids))
            time.sleep(0.02)

    w = threading.Thread(target=watch, daemon=True)
    if uids:
        w.start()
    code = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            try:\n"
        "                os.setsid()\n"  # escape the process group
        "            except OSError:\n"
        "                pass\n"
        "    except OSError:\n"
        "        pass\n"
    )
    t = time.monotonic()
    try:
        r = run_sandboxed(code, "", timeout_s=3.0, cpu_s=3, max_procs=16, memory_mb=256, backend=backend,
                          cgroup=cgroup)
    finally:
        stop.set()
        if uids:
            w.join()
    assert time.monotonic() - t < 3.0 + 3
    assert not r.ok
    # 16 interpreters can also meet the memory budget on a loaded machine; memory then comes first
    want = "memory" if r.limits.get("memory") else "pids"
    assert r.status == want and r.limits["pids"] >= 1, (r.status, r.limits, r.cpu_s, r.wall_s, r.stderr[-500:])
    assert ("cgroup-" in " ".join(r.mechanisms)) == (cgroup == "require")
    if uids:
        assert peak[0] <= 16 + 1, f"more sandbox processes than max_procs: {peak[0]}"
    assert _host_procs() < before + 20
    _assert_host_unaffected(r)
    # the machine still works: a normal sandbox run right after succeeds
    assert run_sandboxed("print(6*7)", "", backend=backend, cgroup=cgroup).stdout == "42\n"


_SPREAD_BOMB = """
import os, time
kids = []
for _ in range({n}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        held = [bytearray(b"\\1") * (16 << 20) for _ in range({per_mb} // 16)]  # written: resident
        time.sleep(0.5)
        os._exit(0)
    kids.append(pid)
print([os.waitpid(k, 0)[1] for k in kids])
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb_is_killed(backend):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    r = run_sandboxed(code, "", timeout_s=5.0, memory_mb=128, backend=backend)
    assert r.exit_code != 0 and not r.ok
    assert r.killed_reason == "memory_limit", (r.killed_reason, r.stderr[-300:])
    assert r.status == "memory" and r.limits["memory"] >= 1
    _assert_host_unaffected(r)


@pytest.mark.skipif(not CGROUP, reason=f"no per-sandbox cgroups here: {sb.cgroup_support()[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb_spread_over_processes_hits_the_cgroup(backend):
    """6 processes x 48 MiB: each is under the per-process RLIMIT_AS (128 MiB), the sum is over the
    cgroup's 128 + 64 MiB: the OOM killer of the sandbox's cgroup kills some (it may pick the parent)."""
    r = run_sandboxed(_SPREAD_BOMB.format(n=6, per_mb=48), "", timeout_s=15.0, memory_mb=128, max_procs=16,
                      backend=backend, cgroup="require")
    assert r.status == "memory" and r.limits["memory"] >= 1, (r.status, r.limits, r.stdout, r.stderr[-300:])
    assert "MemoryError" not in r.stderr  # no single process reached its RLIMIT_AS: the cgroup did it
    _assert_host_unaffected(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb_spread_over_processes_without_cgroup(backend):
    """The fallback bounds memory_mb per process and max_procs processes: a child over memory_mb fails."""
    r = run_sandboxed(_SPREAD_BOMB.format(n=6, per_mb=96), "", timeout_s=15.0, memory_mb=64, max_procs=4,
                      backend=backend, cgroup="off")
    assert "memory:per-process-RLIMIT_AS(no-cgroup)" in r.mechanisms
    assert r.exit_code == 0, (r.status, r.limits, r.killed_reason, r.wall_s, r.stdout, r.stderr[-1000:])
    statuses = eval(r.stdout.strip().splitlines()[-1])  # noqa: S307 - our own program's output
    assert statuses and all(os.waitstatus_to_exitcode(s) == 1 for s in statuses), statuses
    assert r.status == "memory" and r.limits["memory"] == len(statuses), (r.limits, r.stderr[-300:])
    _assert_host_unaffected(r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_to_etc_and_home_are_denied_and_counted(backend):
    if backend == "none" and not IS_ROOT:
        pytest.skip("backend 'none' without root cannot protect the user's own files")
    tag = uuid.uuid4().hex[:10]
    targets = [f"/etc/x_outside_{tag}", os.path.join(os.path.expanduser("~"), f"x_outside_{tag}")]
    code = (
        "import os\n"
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'w').write('pwned')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('denied', p, type(e).__name__)\n"
        "open(os.path.join(os.environ['HOME'], 'mine.txt'), 'w').write('ok')\n"  # the sandbox's own HOME
        "print(open('mine.txt').read())\n"
    )
    try:
        r = run_sandboxed(code, "", backend=backend)
        assert "WROTE" not in r.stdout and r.stdout.count("denied") == 2, r.stdout + r.stderr
        assert r.stdout.rstrip().endswith("ok") and r.exit_code == 0
        assert r.status == "fs" and r.limits == {"fs": 2}, (r.status, r.limits)
        _assert_host_unaffected(r)
    finally:
        for p in targets:
            if os.path.exists(p):
                os.remove(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_outside_the_work_dir_fail(backend):
    tag = uuid.uuid4().hex[:10]
    targets = [f"/tmp/x_outside_{tag}", str(REPO / f"x_outside_{tag}")]
    if backend == "none":
        # best effort only: world-writable /tmp is writable without a mount namespace
        targets = targets[1:] if IS_ROOT else []
        if not targets:
            pytest.skip("backend 'none' without root cannot protect the user's own files")
    code = (
        "import sys\n"
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        with open(p, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('denied', p, type(e).__name__)\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print(open('inside.txt').read())\n"
    )
    try:
        r = run_sandboxed(code, "", backend=backend)
        assert "WROTE" not in r.stdout, r.stdout
        assert r.stdout.count("denied") == len(targets)
        assert r.stdout.rstrip().endswith("ok") and r.exit_code == 0
        for p in targets:
            assert not os.path.exists(p)
    finally:
        for p in targets:
            if os.path.exists(p):
                os.remove(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_limit(backend):
    code = "f = open('big', 'wb')\nf.write(b'x' * (3 << 20))\nf.close()\nprint('wrote')\n"
    r = run_sandboxed(code, "", max_file_mb=1, backend=backend)
    assert "wrote" not in r.stdout and r.exit_code != 0


@pytest.mark.parametrize("backend", NS_BACKENDS)
def test_network_is_blocked(backend):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "s = socket.socket()\n"
            "s.settimeout(1.0)\n"
            "try:\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "    print('CONNECTED')\n"
            "except OSError as e:\n"
            "    print('blocked', type(e).__name__)\n"
        )
        r = run_sandboxed(code, "", backend=backend)
        assert "CONNECTED" not in r.stdout and "blocked" in r.stdout, r.stdout + r.stderr
        assert "netns" in r.mechanisms
        assert r.status == "network" and r.limits == {"network": 1}, (r.status, r.limits)
        srv.settimeout(0.3)
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


def test_none_backend_says_network_is_not_isolated():
    if "none" not in BACKENDS:
        pytest.skip("no 'none' backend")
    r = run_sandboxed("print(1)", "", backend="none")
    assert "network:NOT-isolated" in r.mechanisms


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_limit(backend):
    r = run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "",
                      max_output_bytes=100_000, backend=backend)
    assert r.killed_reason == "output_limit" and len(r.stdout) == 100_000


def test_parallel_runs():
    code = "import sys, time\ntime.sleep(1.0)\nprint(int(sys.stdin.read()) * 2)\n"
    t = time.monotonic()
    res = run_sandboxed_many([(code, "1"), (code, "2")], max_concurrency=2)
    wall = time.monotonic() - t
    assert [r.stdout for r in res] == ["2\n", "4\n"]
    assert wall < 2.2, f"two 1 s runs took {wall:.2f} s: not parallel"
    res = run_sandboxed_many([("print(input())", str(i)) for i in range(6)], max_concurrency=3)
    assert [r.stdout.strip() for r in res] == [str(i) for i in range(6)]
    if IS_ROOT:
        assert _procs_of(_pool_uids()) == 0


def test_unknown_backend_or_cgroup_mode():
    with pytest.raises(ValueError, match="unknown backend"):
        run_sandboxed("print(1)", "", backend="docker")
    with pytest.raises(ValueError, match="cgroup must be"):
        run_sandboxed("print(1)", "", cgroup="yes")


@pytest.mark.skipif(not CGROUP, reason="no per-sandbox cgroups here")
def test_cgroup_that_cannot_be_joined_falls_back_or_fails(monkeypatch):
    """A backend in which joining fails (e.g. a user namespace) gets the rlimit fallback under 'auto'."""
    monkeypatch.setitem(sb._CG_WORKS, BACKENDS[0], (False, "join refused"))
    r = run_sandboxed("print(1)", "", backend=BACKENDS[0])
    assert r.ok and "memory:per-process-RLIMIT_AS(no-cgroup)" in r.mechanisms
    with pytest.raises(RuntimeError, match="join refused"):
        run_sandboxed("print(1)", "", backend=BACKENDS[0], cgroup="require")


def test_code_reward_counts_the_limits_that_tripped():
    """The code reward reports, per sample, in how many test runs each sandbox limit tripped."""
    from megatron_kimi.rl.rewards import RewardInput, get_reward

    sneaky = ("import socket\ntry:\n    socket.create_connection(('10.0.0.1', 80), timeout=0.5)\n"
              "except OSError:\n    pass\nprint(int(input()) * 2)\n")
    hog = "x = [bytearray(16 << 20) for _ in range(64)]\nprint(int(input()) * 2)\n"
    tests = [{"input": "1", "output": "2"}, {"input": "3", "output": "6"}]
    samples = [RewardInput("q", f"```python\n{c}```", None, "code", tests, {}) for c in (sneaky, hog)]
    out = get_reward("code", all_or_nothing=False, memory_mb=128, timeout_s=5.0)(samples)
    assert out[0].score == 1.0 and out[0].info["limits"] == {"network": 2}  # counted, still judged
    assert out[1].score == 0.0 and out[1].info["limits"] == {"memory": 2}, out[1].info
    assert out[1].info["verdicts"] == ["memory_limit", "memory_limit"]
