"""Model FLOPs/params formulas (checked against torch's FLOP counter on the HF twin) and bench_train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_kimi.config import ModelConfig
from megatron_kimi.model.flops import attention_flops, dense_flops_per_token, num_params, peak_tflops, training_flops

REPO = Path(__file__).resolve().parents[2]
M = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                max_position_embeddings=64, tie_word_embeddings=False)


def test_hand_counted_flops():
    # per layer: qkv 2*64*(64+2*32) + proj 2*64*64 + mlp 2*3*64*256 = 122880; logits 2*64*128
    assert dense_flops_per_token(M, 128) == 2 * 122880 + 16384
    assert attention_flops(M, [3, 1]) == 2 * 2 * 2 * 2 * 32 * (6 + 1)  # causal pairs: 3*4/2 + 1
    assert training_flops(M, 128, [3, 1]) == 3 * (262144 * 4 + attention_flops(M, [3, 1]))
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4 and peak_tflops(None, "bf16") is None


def test_formulas_match_the_hf_llama_twin():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="eager"))
    assert num_params(M, 128) == sum(p.numel() for p in hf.parameters())
    seq = 16
    with FlopCounterMode(display=False) as fc:
        hf(torch.zeros(1, seq, dtype=torch.long))
    counted = fc.get_total_flops()
    dense = dense_flops_per_token(M, 128) * seq
    full_attn = 2 * 2 * 2 * 2 * 32 * seq * seq  # eager attention computes the whole (masked) square
    assert counted == dense + full_attn


@pytest.mark.slow
def test_bench_train_prints_a_table_and_writes_json(tmp_path):
    out = subprocess.run([sys.executable, "tools/bench_train.py", "examples/tiny/train.yaml", "--steps", "2",
                          "--warmup", "1", "--json", str(tmp_path / "r.json")], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout and "MFU               n/a" in out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["params"] == r["params_rank0"] == 131392
    assert r["tokens_per_step"] == 16 * 64 and r["tokens_per_s"] > 0 and r["mfu"] is None
    assert r["peak_memory_mb"] > 0 and r["device"] == "cpu"
    # the profiled step's breakdown: GEMMs and the attention/norm/loss scopes were seen, all time accounted
    b = r["breakdown"]
    assert b["on_device"] is False and "time breakdown of one profiled step" in out.stdout
    for category in ("gemm", "attention", "norm", "loss", "optimizer"):
        assert b["seconds"][category] > 0, (category, b)
    assert abs(sum(b["seconds"].values()) - b["wall_s"]) <= 0.05 * b["wall_s"] + 1e-3, b
