"""GPU checks (NCCL, bf16). Skipped without CUDA; run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist import run_distributed
from tests.parallel.harness import train_layout

pytestmark = pytest.mark.gpu


@pytest.mark.gpu(count=2)
def test_nccl_tp2_matches_single_gpu(tmp_path):
    ref = run_distributed(train_layout, 1, [], 3, str(tmp_path / "a"), False)[0]
    tp2 = run_distributed(train_layout, 2, ["parallel.tensor=2"], 3, str(tmp_path / "b"), False)[0]
    for a, b in zip(ref["records"], tp2["records"]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)


def one_b_bf16_steps(rank, world_size, run_dir):
    """~1.2B-parameter Llama-style model, bf16, 3 steps of 4 x 2048 tokens; returns timings."""
    import time

    overrides = [
        "model.num_layers=16", "model.hidden_size=2048", "model.ffn_hidden_size=5504",
        "model.num_attention_heads=16", "model.num_query_groups=4", "model.max_position_embeddings=2048",
        "model.vocab_size=32000", "model.tie_word_embeddings=false", "precision.dtype=bf16",
        "training.seq_length=2048", "training.micro_batch_size=1", "training.global_batch_size=4",
    ]
    from tests.parallel import harness

    t0 = time.perf_counter()
    out = harness.train_layout(rank, world_size, overrides, 3, run_dir, False)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out.pop("params")
    return out


def test_bf16_step_of_a_1b_model(tmp_path):
    out = run_distributed(one_b_bf16_steps, 1, str(tmp_path), timeout=900)[0]
    recs = out["records"]
    print("1B bf16: step times", [round(r.get("step_time_s", 0), 3) for r in recs], "peak GiB", round(out["peak_gib"], 1))
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]
