"""tools/bench_demo.py: seed lists, the per-cell goal, the per-device aggregation and the table (no demo runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_demo", Path(__file__).resolve().parents[2] / "tools" / "bench_demo.py")
bench_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_demo)


def _cell(device, threads, seed, before, after, wall, error=None):
    c = {"device": device, "threads": threads, "seed": seed, "before": before, "after": after,
         "gain": after - before, "wall_s": wall, "error": error}
    c["passed"] = bench_demo.verdict(c)
    return c


def test_parse_ints():
    assert bench_demo.parse_ints("0,1,2") == [0, 1, 2]
    assert bench_demo.parse_ints("0-4") == [0, 1, 2, 3, 4]
    assert bench_demo.parse_ints("3, 7-8") == [3, 7, 8]
    with pytest.raises(ValueError, match="0-4"):
        bench_demo.parse_ints("a-b")


def test_verdict_needs_a_learned_warmup_and_a_real_gain():
    assert _cell("cpu", 1, 0, 0.30, 0.45, 1)["passed"]
    assert not _cell("cpu", 1, 0, 0.29, 0.90, 1)["passed"]  # the warm-up did not learn the task
    assert not _cell("cpu", 1, 0, 0.60, 0.74, 1)["passed"]  # RL gained too little
    assert not _cell("cpu", 1, 0, float("nan"), float("nan"), 1, error="timeout after 5 s")["passed"]


def test_aggregate_and_table():
    cells = [_cell("cpu", 1, 0, 0.5, 0.8, 100), _cell("cpu", 2, 0, 0.4, 0.5, 300), _cell("cpu", 1, 1, 0.6, 0.9, 200),
             _cell("cuda", 1, 0, 0.5, 0.9, 50),
             _cell("cuda", 1, 1, float("nan"), float("nan"), 900, error="exit code 1")]
    s = bench_demo.aggregate(cells)
    assert s["cpu"]["cells"] == 3 and s["cpu"]["passed"] == 2
    assert s["cpu"]["before"] == {"min": 0.4, "median": 0.5, "max": 0.6}
    assert s["cpu"]["gain"]["min"] == pytest.approx(0.1) and s["cpu"]["gain"]["max"] == pytest.approx(0.3)
    assert s["cpu"]["wall_s"] == {"min": 100, "median": 200, "max": 300}
    # a failed cell counts in the pass rate and the wall time, not in the accuracies
    assert s["cuda"]["passed"] == 1 and s["cuda"]["after"] == {"min": 0.9, "median": 0.9, "max": 0.9}
    assert s["cuda"]["wall_s"]["max"] == 900
    table = bench_demo.format_report(cells, s).splitlines()
    assert len(table) == 1 + len(cells) + 2 + len(s)
    assert table[1].split()[:7] == ["cpu", "1", "0", "0.500", "0.800", "+0.300", "pass"]
    assert "FAIL" in table[3] and table[3].split()[:3] == ["cpu", "2", "0"] and "exit code 1" in table[5]
    assert table[-2].split()[:2] == ["cpu", "2/3"] and "0.400/0.500/0.600" in table[-2]
