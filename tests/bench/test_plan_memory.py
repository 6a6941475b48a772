"""tools/plan_memory.py: hand-checked parts, the shipped 128k configs fit, and planned vs measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_kimi.config import ModelConfig, RecomputeConfig
from megatron_kimi.model.memory import GIB, Layout, plan

REPO = Path(__file__).resolve().parents[2]


def test_static_parts_by_hand():
    m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=2,
                    tie_word_embeddings=True)
    params = 2 * (64 * 192 + 64 * 64 + 3 * 64 * 256 + 2 * 64) + 128 * 64  # layers + tied embedding
    pl = plan(m, 128, Layout(tp=1, pp=1, cp=1, dp=4), 64, "bf16", RecomputeConfig(), 1)
    assert pl.parts["weights"] == 2 * params and pl.parts["grads"] == 4 * params
    assert pl.parts["optimizer"] == 12 * params / 4  # master + m + v, sharded over DP
    tp2 = plan(m, 128, Layout(tp=2, pp=1, cp=1, dp=2), 64, "bf16", RecomputeConfig(), 1)
    assert tp2.parts["weights"] == pl.parts["weights"] / 2
    full = plan(m, 128, Layout(tp=1, pp=1, cp=1, dp=4), 64, "bf16", RecomputeConfig(granularity="full"), 1)
    assert full.parts["activations"] < pl.parts["activations"] / 10


@pytest.mark.parametrize("config, nodes", [("examples/long_context/qwen2_7b_128k.yaml", 1),
                                           ("examples/long_context/qwen2_32b_128k.yaml", 4)])
def test_shipped_128k_configs_fit_on_h100(config, nodes, tmp_path):
    out = subprocess.run([sys.executable, "tools/plan_memory.py", config, "--nodes", str(nodes), "--json",
                          str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "-> fits" in out.stdout, out.stdout + out.stderr
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["fits"] and r["total_gib"] < 80
    no_recompute = subprocess.run([sys.executable, "tools/plan_memory.py", config, "--nodes", str(nodes),
                                   "recompute.granularity=null"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert no_recompute.returncode == 1 and "DOES NOT FIT" in no_recompute.stdout  # 128k needs recompute


def test_default_world_is_the_smallest_that_holds_the_layout(tmp_path):
    """Without --world/--nodes the 32B config (tp 8 x cp 4 = 32) plans on 4 nodes, not one (world 8)."""
    from types import SimpleNamespace

    from megatron_kimi.bench.plan_memory import default_world

    lay = lambda tp, pp, cp: SimpleNamespace(tensor=tp, pipeline=pp, context=cp)  # noqa: E731
    assert default_world(lay(8, 1, 4), 8) == 32
    assert default_world(lay(1, 1, 1), 8) == 8  # as before: one node
    assert default_world(lay(3, 1, 4), 8) == 24  # 12 does not divide 16: 3 nodes
    assert default_world(lay(2, 2, 1), 4) == 4
    out = subprocess.run([sys.executable, "tools/plan_memory.py", "examples/long_context/qwen2_32b_128k.yaml",
                          "--json", str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "-> fits" in out.stdout, out.stdout + out.stderr
    assert "assuming world 32 = 4 node(s) x 8 GPUs" in out.stdout
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["world"] == 32 and r["world_assumed"]
    bad = subprocess.run([sys.executable, "tools/plan_memory.py", "examples/long_context/qwen2_32b_128k.yaml",
                          "--nodes", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--nodes must be >= 1" in bad.stderr


MEASURED = ["training.seq_length=2048", "model.max_position_embeddings=2048", "model.hidden_size=384",
            "model.ffn_hidden_size=1536", "model.num_attention_heads=6", "model.num_query_groups=6",
            "model.num_layers=4", "model.vocab_size=8192", "training.global_batch_size=1",
            "training.micro_batch_size=1"]


@pytest.mark.slow
@pytest.mark.parametrize("recompute, tol", [(None, 0.20), ("full", 0.35)])
def test_planner_against_a_measured_cpu_run(tmp_path, recompute, tol):
    """Static part = every live tensor's bytes after a step; step peak = RSS sampled each ms."""
    args = MEASURED + ([f"recompute.granularity={recompute}"] if recompute else [])
    out = subprocess.run([sys.executable, "tools/plan_memory.py", "examples/tiny/train.yaml", *args, "--world", "1",
                          "--measure", "--json", str(tmp_path / "m.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())["measured"]
    assert m["static_mib"] == pytest.approx(m["planned_static_mib"], rel=0.02)
    assert m["step_peak_mib"] == pytest.approx(m["planned_peak_mib"], rel=tol), m
    assert m["step_peak_mib"] * 1.0 > 50  # big enough to be a measurement, not noise


def test_vision_tower_is_planned():
    """A VLM's plan has a ``vision`` part: the tower's static bytes by hand, activations linear in patches."""
    from megatron_kimi.config import ModelConfig, RecomputeConfig
    from megatron_kimi.model.flops import vision_num_params
    from megatron_kimi.model.memory import Layout, plan
    from megatron_kimi.model.vision.config import VisionConfig

    v = VisionConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    m = ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, vision=v)
    lay = Layout(tp=1, pp=1, cp=1, dp=1)
    text_only = plan(ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4),
                     256, lay, 64, "bf16", RecomputeConfig(), 1)
    none = plan(m, 256, lay, 64, "bf16", RecomputeConfig(), 1, image_patches=0)
    some = plan(m, 256, lay, 64, "bf16", RecomputeConfig(), 1, image_patches=100)
    assert "vision" not in text_only.parts
    assert none.parts["vision"] == vision_num_params(m) * (2 + 4 + 12)  # bf16 weights, fp32 grads, Adam + master
    assert some.parts["vision"] - none.parts["vision"] == 2 * (8 * 64 + 2 * 128) * 4 * 100
    worst = plan(m, 256, lay, 64, "bf16", RecomputeConfig(), 1)  # default: every token an image token
    assert worst.parts["vision"] - none.parts["vision"] == 2 * (8 * 64 + 2 * 128) * 4 * 64 * 4
