"""tests.dist.run_distributed: real gloo process groups on spawned ranks, failures, timeouts, cleanup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(120)


def _all_reduce(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_kimi.platform.launch import detect_env, init_process_group

    env = detect_env()
    backend = init_process_group(env, timeout_s=60)
    t = torch.tensor([float(rank + 1), 10.0 * rank])
    dist.all_reduce(t)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rank * rank)
    return {"backend": backend, "sum": t.tolist(), "gathered": gathered, "env": (env.rank, env.world_size),
            "launcher": env.launcher, "threads": torch.get_num_threads(), "extra": os.environ.get("DIST_EXTRA")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce(world_size):
    results = run_distributed(_all_reduce, world_size, env={"DIST_EXTRA": "yes"})
    n = world_size
    expected_sum = [n * (n + 1) / 2, 10.0 * n * (n - 1) / 2]
    assert len(results) == n
    for rank, r in enumerate(results):
        assert r["backend"] == "gloo"
        assert r["env"] == (rank, n) and r["launcher"] == "torchrun"
        assert r["sum"] == expected_sum
        assert r["gathered"] == [i * i for i in range(n)]
        assert r["threads"] == 1 and r["extra"] == "yes"


def _fails_on_rank_1(rank: int, world_size: int, message: str) -> int:
    if rank == 1:
        raise ValueError(message)
    return rank


def test_failing_rank_is_reported():
    with pytest.raises(RuntimeError) as info:
        run_distributed(_fails_on_rank_1, 2, "boom-from-the-test-body", timeout=60)
    text = str(info.value)
    assert "rank 1" in text and "boom-from-the-test-body" in text
    assert "ValueError" in text and "_fails_on_rank_1" in text  # the full traceback came back
    assert "rank 0 failed" not in text


def _hangs_on_rank_1(rank: int, world_size: int, pid_dir: str) -> int:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)
    return rank


def _gone(pid: int) -> bool:
    """True if no such process exists: neither running nor a zombie (i.e. it was also reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_hanging_rank_times_out_and_is_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_distributed(_hangs_on_rank_1, 2, str(tmp_path), timeout=20)
    elapsed = time.monotonic() - start
    assert "ranks [1] of 2 did not finish" in str(info.value)  # rank 0 finished: not named
    assert elapsed < 20 + 10, elapsed
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids), pids
