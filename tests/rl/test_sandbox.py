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


def _host_procs() -> int:
    return sum(1 for n in os.listdir("/proc") if n.isdigit())


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_loop_is_killed(backend):
    t = time.monotonic()
    r = run_sandboxed("while True:\n    pass\n", "", timeout_s=1.5, cpu_s=1, backend=backend)
    assert time.monotonic() - t < 1.5 + 2
    assert r.exit_code != 0 and r.killed_reason in ("cpu_limit", "wall_timeout")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleeping_program_hits_wall_timeout(backend):
    t = time.monotonic()
    r = run_sandboxed("import time\ntime.sleep(60)\n", "", timeout_s=1.0, backend=backend)
    assert time.monotonic() - t < 1.0 + 2
    assert r.timed_out and r.killed_reason == "wall_timeout" and not r.ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_bomb_is_contained(backend):
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
        r = run_sandboxed(code, "", timeout_s=2.0, cpu_s=2, max_procs=16, memory_mb=128, backend=backend)
    finally:
        stop.set()
        if uids:
            w.join()
    assert time.monotonic() - t < 2.0 + 3
    assert not r.ok
    if uids:
        assert peak[0] <= 16 + 1, f"more sandbox processes than max_procs: {peak[0]}"
    deadline = time.monotonic() + 3
    while uids and _procs_of(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    if uids:
        assert _procs_of(uids) == 0, "fork-bomb processes survived the run"
    assert _host_procs() < before + 20
    # the machine still works: a normal sandbox run right after succeeds
    assert run_sandboxed("print(6*7)", "", backend=backend).stdout == "42\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb_is_killed(backend):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    r = run_sandboxed(code, "", timeout_s=5.0, memory_mb=256, backend=backend)
    assert r.exit_code != 0 and not r.ok
    assert r.killed_reason in ("memory_limit", "cpu_limit", "wall_timeout") or r.killed_reason.startswith("signal:")
    assert r.killed_reason == "memory_limit", (r.killed_reason, r.stderr[-300:])


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


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        run_sandboxed("print(1)", "", backend="docker")
