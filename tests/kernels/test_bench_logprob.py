"""tools/bench_logprob.py runs end to end at tiny sizes and reports a fused/naive memory ratio < 1.

(This checks the tool, not the <= 1/10 goal, which needs realistic T, V: see tools/BENCHMARKS.md.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_logprob_tiny():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the torch chunked path; the interpreter would be far too slow here
    cmd = [sys.executable, str(REPO / "tools" / "bench_logprob.py"), "--vocab", "20000", "--tokens", "512",
           "--hidden", "64", "--backend", "torch", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    ratio = float(re.search(r"ratio fused/naive: ([0-9.]+)", out).group(1))
    assert 0 < ratio < 1, out
    assert re.search(r"^naive\s+[0-9.]+\s+[0-9.]+$", out, re.M) and re.search(r"^fused\s+[0-9.]+\s+[0-9.]+$", out, re.M)
