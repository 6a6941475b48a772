"""tools/bench_rollout.py end to end on a tiny model: the rows, the paired per-round speedups, greedy
agreement, and the vLLM rows skipped with the reason where vllm does not import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_rollout_pairs_rounds_and_agrees(tmp_path):
    tiny = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "2", "--kv-heads", "1", "--vocab", "100",
            "--prompts", "6", "--prompt-len", "8", "--min-new", "2", "--max-new", "12", "--max-batch-size", "4"]
    out = subprocess.run([sys.executable, "tools/bench_rollout.py", *tiny, "--engines", "hf,builtin,vllm",
                          "--repeats", "3", "--settle-s", "0", "--json", str(tmp_path / "r.json")], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    keys = [row["key"] for row in r["rows"]]
    try:
        import vllm  # noqa: F401
    except Exception:
        assert keys == ["builtin", "hf"]  # HF, the baseline, is timed last whatever the order asked
        assert "make venv-vllm" in r["skipped"]["vllm"] and "vLLM row skipped" in out.stdout
    else:
        assert keys == ["builtin", "vllm", "hf"]
    rows = {row["key"]: row for row in r["rows"]}
    assert rows["builtin"]["useful"] == rows["hf"]["useful"] > 0
    walls_e, walls_h = rows["builtin"]["all_wall_s"], rows["hf"]["all_wall_s"]
    assert len(walls_e) == len(walls_h) == 3
    assert rows["builtin"]["paired_speedups"] == [h / e for e, h in zip(walls_e, walls_h)]
    assert rows["hf"]["speedup"] == 1.0 and "paired_speedups" not in rows["hf"]
    assert r["identical_outputs"] == 6  # greedy: the engine and HF generate give the same tokens
    assert "paired speedup over HF generate" in out.stdout
