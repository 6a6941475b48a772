"""Run the embedded RL demo over a seed x thread-count x device matrix and check its goal in every cell.

Each cell is the real demo, ``DEMO_SEED=N OMP_NUM_THREADS=T bash slurm/rl.sh`` with its own DEMO_DIR
under ``--out`` (CPU cells hide every GPU), run as a separate process, ``--jobs`` at a time. Prints one
row per cell and min / median / max per device, writes ``--json``, and exits 1 if any cell misses the
goal: held-out accuracy before >= 0.30 (the warm-up learned the task) and after - before >= 0.15.

    python tools/bench_demo.py --seeds 0-4 --threads 1,2 --devices cpu,cuda --jobs 14 --json bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_BEFORE, MIN_GAIN = 0.30, 0.15


def parse_ints(text: str) -> list[int]:
    """'0,1,2' or '0-4' or '0-2,7' -> [0, 1, 2, ...] (a range includes both ends)."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"expected numbers like 0,1,2 or 0-4, got {text!r}") from None
    return out


def verdict(cell: dict) -> bool:
    return (cell["error"] is None and cell["before"] >= MIN_BEFORE
            and cell["after"] - cell["before"] >= MIN_GAIN - 1e-9)


def run_cell(device: str, threads: int, seed: int, out: Path, py: str, timeout: float) -> dict:
    demo_dir = out / f"{device}-t{threads}-s{seed}"
    demo_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEMO_SEED=str(seed), OMP_NUM_THREADS=str(threads), DEMO_DIR=str(demo_dir), PY=py,
               NPROC="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # slurm/rl.sh would otherwise train on a visible GPU
    cell = {"device": device, "threads": threads, "seed": seed, "dir": str(demo_dir), "error": None}
    t0 = time.monotonic()
    with open(demo_dir / "demo.log", "w") as log:
        # own session: a timeout kills the whole process group (bash, python, tokenizer workers)
        proc = subprocess.Popen(["bash", "slurm/rl.sh"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    cell["wall_s"] = time.monotonic() - t0
    summary = demo_dir / "rl" / "summary.json"
    if rc is None:
        cell["error"] = f"timeout after {timeout:.0f} s"
    elif rc != 0:
        cell["error"] = f"exit code {rc} (see {demo_dir / 'demo.log'})"
    elif not summary.is_file():
        cell["error"] = f"no {summary}"
    if cell["error"] is None:
        s = json.loads(summary.read_text())
        cell["before"], cell["after"] = s["before"]["accuracy"], s["after"]["accuracy"]
    else:
        cell["before"] = cell["after"] = float("nan")
    cell["gain"] = cell["after"] - cell["before"]
    cell["passed"] = verdict(cell)
    return cell


def aggregate(cells: list[dict]) -> dict:
    """Per device: min / median / max of before, after, gain and wall time over the cells that finished."""
    out = {}
    for device in sorted({c["device"] for c in cells}):
        mine = [c for c in cells if c["device"] == device]
        done = [c for c in mine if c["error"] is None]
        out[device] = {"cells": len(mine), "passed": sum(c["passed"] for c in mine)}
        for key in ("before", "after", "gain", "wall_s"):
            vals = [c[key] for c in (done if key != "wall_s" else mine)]
            out[device][key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)} if vals else None
    return out


def format_report(cells: list[dict], summary: dict) -> str:
    lines = [f"{'device':<6} {'thr':>3} {'seed':>4} {'before':>7} {'after':>7} {'gain':>7} {'result':<6} {'wall':>7}"]
    for c in sorted(cells, key=lambda c: (c["device"], c["threads"], c["seed"])):
        lines.append(f"{c['device']:<6} {c['threads']:>3} {c['seed']:>4} {c['before']:>7.3f} {c['after']:>7.3f} "
                     f"{c['gain']:>+7.3f} {'pass' if c['passed'] else 'FAIL':<6} {c['wall_s']:>6.0f}s"
                     + (f"  {c['error']}" if c["error"] else ""))
    lines.append("")
    lines.append(f"{'device':<6} {'passed':>7}  {'before min/med/max':<19} {'after min/med/max':<19} "
                 f"{'gain min/med/max':<22} wall min/med/max")
    for device, s in summary.items():
        def mmm(key, fmt):
            return "n/a" if s[key] is None else "/".join(format(s[key][q], fmt) for q in ("min", "median", "max"))
        lines.append(f"{device:<6} {s['passed']:>3}/{s['cells']:<3}  {mmm('before', '.3f'):<19} "
                     f"{mmm('after', '.3f'):<19} {mmm('gain', '+.3f'):<22} {mmm('wall_s', '.0f')} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-4", help="e.g. 0,1,2,3,4 or 0-4")
    ap.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values")
    ap.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda only where torch sees a GPU)")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per cell")
    ap.add_argument("--out", default="runs/bench_demo", help="a DEMO_DIR per cell under this folder")
    ap.add_argument("--json", help="write the cells and the per-device summary here")
    default_py = REPO / ".venv" / "bin" / "python"
    ap.add_argument("--py", default=str(default_py) if default_py.exists() else sys.executable)
    args = ap.parse_args(argv)
    try:
        seeds, threads = parse_ints(args.seeds), parse_ints(args.threads)
    except ValueError as e:
        ap.error(str(e))
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if bad := [d for d in devices if d not in ("cpu", "cuda")]:
        ap.error(f"--devices: unknown {bad} (cpu, cuda)")
    if "cuda" in devices:
        has_cuda = subprocess.run([args.py, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                                  capture_output=True).returncode == 0
        if not has_cuda:
            print("bench_demo: no CUDA device visible: skipping the cuda cells", file=sys.stderr)
            devices.remove("cuda")
    if not devices:
        ap.error("no device to run on")
    out = Path(args.out).resolve()
    matrix = list(itertools.product(devices, threads, seeds))
    print(f"bench_demo: {len(matrix)} cells, {args.jobs} at a time, logs under {out}", flush=True)
    if min(args.jobs, len(matrix)) * max(threads) > (os.cpu_count() or 1):
        # measured on 2 busy cores: OMP_NUM_THREADS=2 SFT steps took 2.5 s instead of 0.1 s (spin-waiting
        # OpenMP threads); OMP_WAIT_POLICY=PASSIVE changes the waiting, not the numbers
        print(f"bench_demo: warning: {args.jobs} jobs x up to {max(threads)} threads > {os.cpu_count()} cores; "
              "cells will be slow (fewer --jobs, or export OMP_WAIT_POLICY=PASSIVE)", file=sys.stderr)

    def one(cell_args):
        cell = run_cell(*cell_args, out=out, py=args.py, timeout=args.timeout)
        print(f"  {cell['device']} t{cell['threads']} s{cell['seed']}: {cell['before']:.3f} -> {cell['after']:.3f} "
              f"({'pass' if cell['passed'] else 'FAIL'}, {cell['wall_s']:.0f} s)", flush=True)
        return cell

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        cells = list(pool.map(one, matrix))
    summary = aggregate(cells)
    print(format_report(cells, summary))
    ok = all(c["passed"] for c in cells)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"goal": {"min_before": MIN_BEFORE, "min_gain": MIN_GAIN},
                                               "passed": ok, "cells": cells, "summary": summary}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
