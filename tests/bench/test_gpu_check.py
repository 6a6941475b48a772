"""tools/gpu_check.py: exits 0 without CUDA, and turns each benchmark's real output format into goal rows.

The parsers read what the tools print; a format change that a parser no longer understands would turn
a GPU run's table into "no result" rows, which is exactly what these tests catch on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stdout


def _attention_log(tri_fb, ref_fb, best_fb=None):
    # the row format of kernels/benchmarks/bench_attention.py's report()
    def row(name, fb):
        return f"{name:<22} {1.234:>9.3f} {300.0:>12.1f} {9.876:>11.3f} {fb:>16.1f}"
    lines = ["impl  fwd ms  fwd TFLOP/s  fwd+bwd ms  fwd+bwd TFLOP/s", row("triton varlen", tri_fb),
             row("torch varlen_attn", ref_fb), row("sdpa per-sample", 200.0)]
    if best_fb is not None:
        lines += ["sweep dkdv=(32, 128, 8, 3): fwd+bwd 9.000 ms, 260.0 TFLOP/s",
                  "best tiles: dkdv=(32, 128, 8, 3) dq=(128, 32, 8, 3) "
                  "(default: dkdv=(32, 128, 8, 3) dq=(128, 32, 8, 3))",
                  row("triton best", best_fb)]
    return "\n".join(lines)


def test_parse_attention_default_and_best():
    rows = gpu_check.parse_attention("32k")(_attention_log(150.0, 279.0, best_fb=260.0))
    assert [r.ok for r in rows] == [None, False, True]
    assert "150 / 279 = 54 %" in rows[1].measured
    assert "dkdv=(32, 128, 8, 3)" in rows[2].what and "260 / 279" in rows[2].measured
    rows = gpu_check.parse_attention("32k")(_attention_log(260.0, 279.0))
    assert [r.ok for r in rows] == [None, True]
    assert gpu_check.parse_attention("32k")("Traceback ...")[0].ok is False


def test_parse_logprob_json():
    res = {"variants": {"naive": {"peak_bytes": 23e9, "time_s": 0.086},
                        "fused": {"peak_bytes": 1.7e9, "time_s": 0.07}},
           "forward": {"tflops": 560.0}}
    rows = gpu_check.parse_logprob("noise\n" + json.dumps({"config": {}, **res}))
    assert [r.ok for r in rows] == [True, True, True]
    res["variants"]["fused"]["time_s"] = 0.1
    assert [r.ok for r in gpu_check.parse_logprob(json.dumps(res))] == [True, False, True]


def test_parse_train_from_the_real_table():
    from megatron_kimi.bench.train import format_table

    r = dict(device="NVIDIA H200", world_size=1, dtype="bf16", transformer_impl="local",
             layout=dict(tp=1, pp=1, cp=1, dp=1), params=1.24e9, tokens_per_step=65536, global_batch_size=16,
             seq_length=4096, step_time_s_median=1.5, step_time_s_min=1.4, steps=6, warmup=2, tokens_per_s=4.37e4,
             tokens_per_s_per_device=4.37e4, tflops_per_device=440.0, mfu=0.4449, peak_tflops=989,
             peak_memory_mb=33000.0, peak_memory_kind="cuda max allocated",
             breakdown={"seconds": {"attention": 0.3, "gemm": 0.9, "idle": 0.05}, "wall_s": 1.5, "on_device": True})
    rows = gpu_check.parse_train(format_table(r))
    assert rows[0].measured == "44.5 %" and rows[0].ok is False
    assert rows[1].measured.startswith("4.37e+04, 33000")
    assert "attention 20.0 %" in rows[2].measured and "gemm 60.0 %" in rows[2].measured


def test_parse_pytest_and_demo():
    rows = gpu_check.parse_pytest("....\nFAILED tests/x.py::test_a - boom\n1 failed, 600 passed, 3 skipped in 200s")
    assert rows[0].ok is False and "1 failed" in rows[0].measured
    assert rows[1].what.strip() == "FAILED tests/x.py::test_a"
    assert gpu_check.parse_pytest("610 passed, 2 skipped in 300.0s")[0].ok is True
    rows = gpu_check.parse_demo("demo: held-out accuracy 0.600 -> 0.900, mean response length 3.4 -> 3.4\n"
                                "demo wall 95 s")
    assert [r.ok for r in rows] == [True, True]
    assert gpu_check.parse_demo("killed")[0].ok is False
