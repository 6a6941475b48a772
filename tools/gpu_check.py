"""One command for a GPU machine: the suite with CUDA visible, every benchmark at GPU sizes, one table.

    make gpu-check                                  # = python tools/gpu_check.py
    python tools/gpu_check.py --only tests,logprob  # a subset of the steps
    python tools/gpu_check.py --out DIR             # also DIR/gpu_check.md, DIR/gpu_check.json, DIR/<step>.log

Each step is a subprocess with its own time limit (a step that overruns or crashes becomes a row that
says so; the others still run). The table puts each goal of the GPU issue beside the value measured.
On a machine without CUDA it says so and exits 0. On a Python 3.12 machine with no internet,
megatron-core and math-verify can come as wheels (../shared/FIELD_NOTES.md, "A GPU machine without
internet"): `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site.

Not the CI: CI has no GPU. Exit code 0 when every step ran (goals missed are shown, not fatal), 1 when a
step crashed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parent.parent
BF16_MATMUL_TFLOPS = 790.0  # measured on the H200 (FIELD_NOTES): the card's practical bf16 GEMM rate


@dataclass
class Row:
    what: str
    measured: str
    goal: str
    ok: bool | None  # None: no goal, or not measured


@dataclass
class Step:
    name: str
    cmd: List[str]
    timeout_s: int
    parse: Callable[[str], List[Row]]
    env: dict = field(default_factory=dict)


def _num(pattern: str, text: str, group: int = 1) -> float | None:
    m = re.search(pattern, text, re.M)
    return float(m.group(group)) if m else None


# ------------------------------------------------------------------------------------ parsers

def parse_pytest(text: str) -> List[Row]:
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped")}
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return [Row("suite with CUDA visible", "no pytest summary line", "all pass", False)]
    for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
        counts["errors" if k.startswith("error") else k] = int(n)
    measured = ", ".join(f"{v} {k}" for k, v in counts.items())
    failed = [ln.split(" - ")[0] for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    rows = [Row("suite with CUDA visible", measured, "0 failed, 0 errors",
                counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0)]
    rows += [Row("  " + f, "", "", False) for f in failed[:20]]
    return rows


def parse_attention(tokens: str) -> Callable[[str], List[Row]]:
    def parse(text: str) -> List[Row]:
        def fb(name):
            return _num(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", text)

        def fw(name):
            return _num(rf"^{re.escape(name)}\s+[\d.]+\s+([\d.]+)", text)

        tri, ref = fb("triton varlen"), fb("torch varlen_attn")
        tri_f, ref_f = fw("triton varlen"), fw("torch varlen_attn")
        if tri is None or ref is None:
            return [Row(f"attention {tokens}: triton vs varlen_attn", "not measured", ">= 90 %", False)]
        rows = [Row(f"attention {tokens} fwd TFLOP/s: triton / varlen_attn", f"{tri_f:.0f} / {ref_f:.0f}", "", None),
                Row(f"attention {tokens} fwd+bwd TFLOP/s: triton (default tiles) / varlen_attn",
                    f"{tri:.0f} / {ref:.0f} = {100 * tri / ref:.0f} %", ">= 90 %", tri >= 0.9 * ref)]
        best = fb("triton best")
        tiles = re.search(r"^best tiles: (.*) \(default", text, re.M)
        if best is not None:
            which = tiles.group(1) if tiles else "?"
            rows.append(Row(f"attention {tokens} fwd+bwd: triton, best swept tiles ({which})",
                            f"{best:.0f} / {ref:.0f} = {100 * best / ref:.0f} %", ">= 90 %", best >= 0.9 * ref))
        return rows
    return parse


def parse_logprob(text: str) -> List[Row]:
    try:
        res = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    except (IndexError, ValueError):
        return [Row("fused log-prob", "no result", "", False)]
    v = res["variants"]
    ratio = v["fused"]["peak_bytes"] / max(1, v["naive"]["peak_bytes"])
    tf, tn = v["fused"]["time_s"], v["naive"]["time_s"]
    fwd = res.get("forward", {}).get("tflops", 0.0)
    return [Row("fused log-prob peak / naive (T8192 H4096 V151936 bf16)", f"{ratio:.3f}", "<= 0.10", ratio <= 0.10),
            Row("fused log-prob fwd+bwd time / naive", f"{tf * 1e3:.1f} / {tn * 1e3:.1f} ms", "<= 1.0x", tf <= tn),
            Row("fused log-prob forward TFLOP/s", f"{fwd:.0f} ({100 * fwd / BF16_MATMUL_TFLOPS:.0f} % of "
                f"{BF16_MATMUL_TFLOPS:.0f})", ">= 60 %", fwd >= 0.6 * BF16_MATMUL_TFLOPS)]


def parse_train(text: str) -> List[Row]:
    mfu = _num(r"^MFU\s+([\d.]+) %", text)
    tps = _num(r"^tokens/s\s+([\d.e+]+)", text)
    mem = _num(r"^peak memory\s+(\d+) MiB", text)
    if mfu is None:
        return [Row("bench_train llama_1b MFU", "no result", ">= 45 %", False)]
    rows = [Row("bench_train llama_1b (local spec, no TE) MFU", f"{mfu:.1f} %", ">= 45 %", mfu >= 45.0),
            Row("bench_train llama_1b tokens/s, peak MiB", f"{tps:.3g}, {mem:.0f}", "", None)]
    # megatron_kimi/bench/breakdown.py's lines: "  <category>  <ms> ms  <pct> %"
    parts = re.findall(r"^  ([a-z]+)\s+[\d.]+ ms\s+([\d.]+) %$", text, re.M)
    if parts:
        rows.append(Row("bench_train llama_1b step time by category", ", ".join(f"{c} {p} %" for c, p in parts), "",
                        None))
    return rows


def parse_rollout(text: str) -> List[Row]:
    row = r"^{}.*?\s(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x$"  # name, useful tokens, wall s, useful tok/s
    eng = _num(row.format("megatron_kimi engine"), text, 3)
    hf = _num(row.format("HF generate"), text, 3)
    if eng is None:
        return [Row("bench_rollout on CUDA", "no result (see log)", "runs", False)]
    speed = f", {eng / hf:.2f}x HF generate ({hf:.0f})" if hf else ""
    return [Row("bench_rollout on CUDA: engine useful tok/s", f"{eng:.0f}{speed}", "runs; vs HF generate", True)]


def parse_demo(text: str) -> List[Row]:
    m = re.search(r"demo: held-out accuracy ([\d.]+) -> ([\d.]+)", text)
    wall = _num(r"^demo wall ([\d.]+) s", text)
    if not m:
        return [Row("demo on one GPU", "did not finish (see log)", "<= 120 s", False)]
    return [Row("demo on one GPU: held-out accuracy", f"{m.group(1)} -> {m.group(2)}", "gain >= 0.15",
                float(m.group(2)) - float(m.group(1)) >= 0.15),
            Row("demo on one GPU: wall time", f"{wall:.0f} s" if wall else "?", "<= 120 s, < 2 CPU cores",
                wall is not None and wall <= 120)]


# -------------------------------------------------------------------------------------- steps

def steps(args) -> List[Step]:
    py = sys.executable
    xdist = ["-n", str(args.workers)] if args.workers > 1 else []
    demo = 'DEMO_DIR="$KIMI_GPU_CHECK_TMP/demo" bash slurm/rl.sh && echo "demo wall $SECONDS s"'
    return [
        # slurm tests would try to apt-install Slurm: an offline GPU machine has neither it nor apt access.
        Step("tests", [py, "-m", "pytest", "-q", "-m", "not slurm", *args.tests.split(), *xdist], args.tests_timeout,
             parse_pytest),
        # --sweep: the backward's tile candidates too (~11 extra compiles); the table shows default and best
        Step("attention", [py, "kernels/benchmarks/bench_attention.py", "--tokens", "32768", "--samples", "8",
                           "--sweep"], 180, parse_attention("32k")),
        Step("attention_128k", [py, "kernels/benchmarks/bench_attention.py", "--tokens", "131072", "--samples", "16",
                                "--iters", "3"], 180, parse_attention("128k")),
        Step("logprob", [py, "tools/bench_logprob.py", "--tokens", "8192", "--hidden", "4096", "--vocab", "151936",
                         "--json"], 180, parse_logprob),
        Step("train", [py, "tools/bench_train.py", "examples/bench/llama_1b.yaml", "model.transformer_impl=local",
                       "--steps", "6", "--warmup", "2"], 240, parse_train),
        # ~1 B Llama (16 layers, d 2048, GQA 16/8, vocab 32000), fp32, greedy.
        Step("rollout", [py, "tools/bench_rollout.py", "--layers", "16", "--hidden", "2048", "--ffn", "5632",
                         "--heads", "16", "--kv-heads", "8", "--vocab", "32000", "--threads", "4"], 240,
             parse_rollout),
        Step("demo", ["bash", "-c", demo], args.demo_timeout, parse_demo, env={"OMP_NUM_THREADS": "2"}),
    ]


def run_step(step: Step, out_dir: Path | None, tmp: Path) -> tuple[List[Row], float, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", KIMI_GPU_CHECK_TMP=str(tmp), **step.env)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=step.timeout_s)
        text, status = proc.stdout, ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text, status = (out.decode(errors="replace") if isinstance(out, bytes) else out), f"timeout {step.timeout_s} s"
    wall = time.monotonic() - t0
    if out_dir is not None:
        (out_dir / f"{step.name}.log").write_text(text)
    rows = step.parse(text)
    if status != "ok":
        rows.append(Row(f"{step.name}: step status", status, "ok", False))
    return rows, wall, status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated steps (tests, attention, attention_128k, logprob, "
                                                 "train, rollout, demo)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="pytest-xdist workers")
    ap.add_argument("--tests", default="tests", help="what pytest runs (default: the whole suite)")
    ap.add_argument("--tests-timeout", type=int, default=330)
    ap.add_argument("--demo-timeout", type=int, default=300)
    ap.add_argument("--out", default=None, help="write gpu_check.md, gpu_check.json and each step's log here")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("gpu-check needs CUDA (no GPU visible here): nothing to do.")
        return 0
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"kimi-gpu-check-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    chosen = steps(args)
    if args.only:
        keep = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in keep]
    chosen = [s for s in chosen if s.name not in set(filter(None, args.skip.split(",")))]

    header = (f"gpu-check on {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}, "
              f"python {sys.version.split()[0]}")
    print(header, flush=True)
    table, record, broken = [], [], False
    for step in chosen:
        print(f"-- {step.name} (limit {step.timeout_s} s) ...", flush=True)
        rows, wall, status = run_step(step, out_dir, tmp)
        broken |= status != "ok"
        print(f"   {status}, {wall:.0f} s", flush=True)
        table += rows
        record.append({"step": step.name, "status": status, "wall_s": round(wall, 1),
                       "rows": [vars(r) for r in rows]})
    mark = {True: "yes", False: "NO", None: ""}
    lines = [header, "", "| what | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.measured} | {r.goal} | {mark[r.ok]} |" for r in table]
    lines += ["", "| step | status | wall s |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['wall_s']} |" for r in record]
    text = "\n".join(lines)
    print("\n" + text)
    if out_dir:
        (out_dir / "gpu_check.md").write_text(text + "\n")
        (out_dir / "gpu_check.json").write_text(json.dumps({"header": header, "steps": record}, indent=1))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
