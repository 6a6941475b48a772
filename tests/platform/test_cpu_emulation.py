"""platform.cpu_emulation: CUDA calls routed to the CPU; untouched when CUDA exists; the RNG trap.

The emulation patches torch process-wide (idempotently); these tests activate it in the pytest process
(this is a CPU machine). The "inactive on CUDA" check runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_kimi.platform import cpu_emulation
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _active():
    assert not torch.cuda.is_available(), "these tests expect a machine without CUDA"
    assert cpu_emulation.activate() is True
    assert cpu_emulation.activate() is True  # idempotent
    assert cpu_emulation.is_active()


# ------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda"), torch.device("cuda", 0)])
def test_factories_with_cuda_device_land_on_cpu(device):
    for make in (lambda: torch.empty(3, device=device), lambda: torch.zeros(2, 2, device=device),
                 lambda: torch.ones(3, device=device), lambda: torch.full((2,), 7.0, device=device),
                 lambda: torch.tensor([1, 2], device=device), lambda: torch.arange(4, device=device),
                 lambda: torch.rand(3, device=device), lambda: torch.randn(3, device=device),
                 lambda: torch.randint(0, 5, (3,), device=device),
                 lambda: torch.zeros_like(torch.ones(2), device=device)):
        assert make().device.type == "cpu"


def test_current_device_as_device():
    assert torch.cuda.current_device() == 0
    t = torch.empty(4, device=torch.cuda.current_device())
    assert t.device == torch.device("cpu")


def test_tensor_cuda_and_to():
    x = torch.arange(3.0)
    assert x.cuda() is x
    assert x.cuda(0).device.type == "cpu"
    assert x.cuda(non_blocking=True).device.type == "cpu"
    for dev in ("cuda", "cuda:0", 0, torch.device("cuda")):
        assert x.to(dev).device.type == "cpu"
    assert x.to(device="cuda").device.type == "cpu"
    y = x.to("cuda", torch.float64)
    assert y.device.type == "cpu" and y.dtype == torch.float64
    assert x.to(torch.float16).dtype == torch.float16  # dtype-only calls still work
    assert x.to(torch.ones(1, dtype=torch.int32)).dtype == torch.int32
    assert x.to("cuda", non_blocking=True).device.type == "cpu"


def test_new_tensor_methods():
    x = torch.ones(2, dtype=torch.float64)
    for t in (x.new_zeros(3, device="cuda"), x.new_ones(3, device=0), x.new_empty(3, device="cuda:0"),
              x.new_full((3,), 2.0, device=torch.device("cuda")), x.new_tensor([1.0], device="cuda")):
        assert t.device.type == "cpu" and t.dtype == torch.float64
    assert x.new_zeros(3, device="cuda").tolist() == [0.0, 0.0, 0.0]


def test_pin_memory_accepted():
    t = torch.empty(4, pin_memory=True)
    assert t.device.type == "cpu"
    t = torch.zeros(4, device="cuda", pin_memory=True)
    assert t.device.type == "cpu"
    assert t.pin_memory() is t
    assert torch.ones(2).to("cuda", non_blocking=True).device.type == "cpu"


def test_type_reports_cuda_names_and_still_converts():
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.ones(2, dtype=torch.int64).type() == "torch.cuda.LongTensor"
    y = torch.ones(2).type(torch.float64)
    assert y.dtype == torch.float64 and y.device.type == "cpu"
    assert torch.ones(2).type("torch.DoubleTensor").dtype == torch.float64
    assert torch.ones(2).type(dtype=torch.int32).dtype == torch.int32


# ------------------------------------------------------------------------------------ runtime stand-ins
def test_memory_queries():
    stats = torch.cuda.memory_stats()
    assert stats["anything"] == 0
    assert stats["allocated_bytes.all.current"] == 0
    assert torch.cuda.memory_allocated() == 0 and torch.cuda.max_memory_allocated() == 0
    assert torch.cuda.memory_reserved() == 0
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.set_device(0)
    assert torch.cuda.get_device_properties(0).total_memory == 0
    assert isinstance(torch.cuda.get_device_name(), str)


def test_streams_events_nvtx():
    s = torch.cuda.Stream()
    with s:
        pass
    with torch.cuda.stream(s):
        x = torch.ones(3) * 2
    s.wait_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().wait_stream(s)
    s.synchronize()
    assert s.query()
    with torch.cuda.stream(torch.cuda.default_stream()):
        pass
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    x = x + 1
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    assert isinstance(ms, float) and ms >= 0.0
    with torch.cuda.nvtx.range("region"):
        torch.cuda.nvtx.range_push("inner")
        torch.cuda.nvtx.range_pop()
    torch.cuda.nvtx.mark("here")
    assert x.tolist() == [3.0, 3.0, 3.0]


def test_cuda_manual_seed_is_the_cpu_generator():
    torch.cuda.manual_seed(5)
    a = torch.rand(6)
    torch.manual_seed(5)
    b = torch.rand(6)
    assert torch.equal(a, b)
    torch.cuda.manual_seed_all(9)
    c = torch.randn(4, device="cuda")
    torch.manual_seed(9)
    assert torch.equal(c, torch.randn(4))


def test_cuda_rng_state_roundtrip():
    torch.manual_seed(3)
    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    a = torch.rand(5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(5), a)
    assert torch.cuda.default_generators[0] is torch.default_generator


def test_lazy_call_runs_immediately():
    calls = []
    torch.cuda._lazy_call(lambda: calls.append(1))
    assert calls == [1]
    torch.cuda._lazy_call(lambda: calls.append(2), seed=True)
    assert calls == [1, 2]


# ------------------------------------------------------------------------------------ inactive on CUDA
_INACTIVE_SCRIPT = textwrap.dedent(
    """
    import torch
    torch.cuda.is_available = lambda: True  # pretend: a CUDA machine
    tensor_attrs = ("cuda", "type", "to", "pin_memory", "new_zeros", "new_empty", "new_ones", "new_full",
                    "new_tensor")
    cuda_attrs = ("current_device", "manual_seed", "get_rng_state", "set_rng_state", "_lazy_call",
                  "synchronize", "memory_stats", "Stream", "Event", "default_generators")
    torch_attrs = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "empty_like")
    before = {
        "tensor": {n: getattr(torch.Tensor, n) for n in tensor_attrs},
        "cuda": {n: getattr(torch.cuda, n) for n in cuda_attrs},
        "torch": {n: getattr(torch, n) for n in torch_attrs},
        "nvtx": torch.cuda.nvtx.range,
    }
    from megatron_kimi.platform import cpu_emulation
    assert cpu_emulation.activate() is False
    assert cpu_emulation.is_active() is False
    assert torch.cuda.current_device is before["cuda"]["current_device"]
    assert torch.Tensor.cuda is before["tensor"]["cuda"]
    assert torch.Tensor.type is before["tensor"]["type"]
    assert torch.empty is before["torch"]["empty"]
    assert torch.Tensor.to is before["tensor"]["to"]
    changed = [f"torch.Tensor.{n}" for n in tensor_attrs if getattr(torch.Tensor, n) is not before["tensor"][n]]
    changed += [f"torch.cuda.{n}" for n in cuda_attrs if getattr(torch.cuda, n) is not before["cuda"][n]]
    changed += [f"torch.{n}" for n in torch_attrs if getattr(torch, n) is not before["torch"][n]]
    changed += ["torch.cuda.nvtx.range"] if torch.cuda.nvtx.range is not before["nvtx"] else []
    assert not changed, changed
    print("INACTIVE-OK")
    """
)


def test_inactive_when_cuda_is_available():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INACTIVE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("INACTIVE-OK")


# ------------------------------------------------------------------------------------ the RNG trap
def _rng_trap_body(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_kimi.platform.launch import detect_env, init_process_group

    init_process_group(detect_env(), timeout_s=60)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        out = {"tp_rank": parallel_state.get_tensor_model_parallel_rank()}
        model_parallel_cuda_manual_seed(123)
        tracker = get_cuda_rng_tracker()

        # (i) the default stream: seeded with the data-parallel seed, the same on all TP ranks
        out["default"] = torch.rand(8, device="cuda")

        # (ii) the model-parallel stream: per TP rank; the default stream is restored after the fork
        state_before = torch.cuda.get_rng_state().clone()
        with tracker.fork():
            out["forked"] = torch.rand(8, device="cuda")
            out["forked_2"] = torch.rand(8)  # the stream advances within the fork
        out["state_restored"] = bool(torch.equal(torch.cuda.get_rng_state(), state_before))
        out["after_fork"] = torch.rand(8)
        torch.cuda.set_rng_state(state_before)
        out["without_fork"] = torch.rand(8)
        with tracker.fork():  # a second fork continues the model-parallel stream
            out["forked_3"] = torch.rand(8)

        # (iii) a dropout mask under the fork is reproducible after re-seeding
        masks = []
        for _ in range(2):
            model_parallel_cuda_manual_seed(123)
            with get_cuda_rng_tracker().fork():
                masks.append(torch.nn.functional.dropout(torch.ones(16, 16, device="cuda"), p=0.5,
                                                         training=True))
        out["masks"] = masks
        gathered = [None] * world_size
        dist.all_gather_object(gathered, out["tp_rank"])
        out["all_tp_ranks"] = gathered
        return out
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_rng_trap_tensor_parallel_streams():
    r0, r1 = run_distributed(_rng_trap_body, 2, timeout=90)
    assert (r0["tp_rank"], r1["tp_rank"]) == (0, 1) and r0["all_tp_ranks"] == [0, 1]
    # (i) default stream identical across TP ranks, and it is the data-parallel seed's stream
    assert torch.equal(r0["default"], r1["default"])
    torch.manual_seed(123)
    assert torch.equal(r0["default"], torch.rand(8))
    # (ii) forked streams differ between TP ranks, and differ from the default stream
    assert not torch.equal(r0["forked"], r1["forked"])
    for r in (r0, r1):
        assert not torch.equal(r["forked"], r["after_fork"])
        assert not torch.equal(r["forked"], r["forked_2"]) and not torch.equal(r["forked_2"], r["forked_3"])
        assert r["state_restored"]
        assert torch.equal(r["after_fork"], r["without_fork"])  # the fork left the default stream alone
    assert torch.equal(r0["after_fork"], r1["after_fork"])
    # (iii) dropout masks: reproducible after re-seeding, per TP rank
    for r in (r0, r1):
        a, b = r["masks"]
        assert torch.equal(a, b)
        assert 0 < int((a == 0).sum()) < a.numel()
    assert not torch.equal(r0["masks"][0], r1["masks"][0])
