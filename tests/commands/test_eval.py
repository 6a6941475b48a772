"""`megatron-kimi eval`: held-out accuracy and response length per checkpoint, a table, json/csv, a PNG."""

from __future__ import annotations

import csv
import json

import pytest

from megatron_kimi.cli import eval_overrides
from megatron_kimi.commands.eval import metrics
from megatron_kimi.config import ConfigError
from tests.commands.test_difficulty import COMMON, _cli

HELDOUT = 5
SAMPLES = 4
# Sampled (the demo checkpoints answer greedily with the same length every time), scored by a reward that
# passes about half of them, up to 10 tokens: accuracies and lengths that tell the metrics apart.
EVAL = ["eval.temperature=1.0", f"eval.samples={SAMPLES}", "data.reward=tests.commands.sample_rewards:even_length",
        "rollout.max_new_tokens=10"]


def _percentile(xs, q):
    """Linear interpolation between the closest ranks (numpy's default), by hand."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two checkpoints (iterations 1 and 2 of a demo RL run), evaluated on the built-in held-out set:
    the first by checkpoint.load, the second as a positional path."""
    tmp = tmp_path_factory.mktemp("eval")
    _cli("rl", "examples/demo/rl.yaml", f"run_dir={tmp / 'rl'}", "rl.iterations=2", "rl.k=2",
         "rl.prompts_per_iteration=2", "data.eval_size=2", "checkpoint.save_interval=1", "checkpoint.keep_last=0",
         *COMMON)
    ckpts = sorted(p for p in (tmp / "rl" / "checkpoints").iterdir() if p.is_dir())
    assert len(ckpts) == 2
    out = _cli("eval", "examples/demo/rl.yaml", f"run_dir={tmp / 'e'}", f"checkpoint.load={ckpts[0]}",
               f"data.eval_size={HELDOUT}", "eval.batch_prompts=2", *COMMON, *EVAL, str(ckpts[1]))
    return tmp, ckpts, out


def test_metrics_match_a_hand_computation_from_the_samples(evaluated):
    tmp, ckpts, out = evaluated
    rows = json.loads((tmp / "e" / "eval.json").read_text())
    assert [r["path"] for r in rows] == [str(c) for c in ckpts]
    assert [r["label"] for r in rows] == [f"rl/{c.name}" for c in ckpts]
    samples = [json.loads(x) for x in (tmp / "e" / "eval_samples.jsonl").read_text().splitlines()]
    for r in rows:
        mine = [s for s in samples if s["checkpoint"] == r["label"]]
        assert len(mine) == r["samples"] == HELDOUT * SAMPLES
        for s in mine:
            assert s["correct"] == (len(s["response"]) % 2 == 0)
            assert 1 <= s["tokens"] <= 10
        tokens = [s["tokens"] for s in mine]
        acc = sum(s["correct"] for s in mine) / len(mine)
        mean = sum(tokens) / len(tokens)
        assert r["accuracy"] == pytest.approx(acc)
        assert r["mean_tokens"] == pytest.approx(mean)
        assert r["p50_tokens"] == pytest.approx(_percentile(tokens, 50))
        assert r["p90_tokens"] == pytest.approx(_percentile(tokens, 90))
        assert r["accuracy_per_1k_tokens"] == pytest.approx(acc / (mean / 1000))
        assert 0 < acc < 1 and len(set(tokens)) > 1  # not degenerate (the percentiles: test_metrics_by_hand)
    # the same held-out set for both checkpoints
    n = HELDOUT * SAMPLES
    assert [s["prompt"] for s in samples[:n]] == [s["prompt"] for s in samples[n:]]
    with open(tmp / "e" / "eval.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["accuracy"]) for t in table] == [r["accuracy"] for r in rows]
    stdout = out.stdout
    for r in rows:
        assert any(line.startswith(r["label"]) and f"{r['accuracy']:8.4f}" in line for line in stdout.splitlines())


def test_writes_the_png(evaluated):
    tmp, _, _ = evaluated
    png = tmp / "e" / "eval_accuracy_vs_length.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_metrics_by_hand():
    m = metrics([True, False, True, True], [10, 20, 30, 100])
    assert m["accuracy"] == 0.75 and m["mean_tokens"] == 40.0
    assert m["p50_tokens"] == 25.0 and m["p90_tokens"] == pytest.approx(79.0)
    assert m["accuracy_per_1k_tokens"] == pytest.approx(0.75 / 0.04)


def test_positional_checkpoints_and_errors(tmp_path):
    assert eval_overrides(["a=1", "x/y", "b=2", "z"]) == ["a=1", "b=2", 'eval.checkpoints=["x/y", "z"]']
    assert eval_overrides(["a=1"]) == ["a=1"]
    with pytest.raises(ConfigError, match="both"):
        eval_overrides(["eval.checkpoints=[a]", "b"])
    out = _cli("eval", "examples/demo/rl.yaml", f"run_dir={tmp_path / 'r'}", *COMMON, check=False)
    assert out.returncode == 2 and "no checkpoint to evaluate" in out.stderr, out.stderr[-2000:]
    out = _cli("eval", "examples/demo/rl.yaml", f"run_dir={tmp_path / 'r'}", *COMMON, str(tmp_path / "nothing"),
               check=False)
    assert out.returncode == 2 and "no checkpoint there" in out.stderr, out.stderr[-2000:]
