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


def offload_optimizer_steps(rank, world_size, run_dir):
    """bf16 with the distributed optimizer: 2 steps, the optimizer state to pinned CPU and back (as a
    colocated rollout does), 1 more step; vs 3 steps without."""
    from megatron_kimi.training.runtime import shutdown
    from tests.parallel.harness import setup_layout

    overrides = ["precision.dtype=bf16", "parallel.distributed_optimizer=true", "model.hidden_size=512",
                 "model.ffn_hidden_size=1408", "model.num_attention_heads=8", "model.num_query_groups=8"]
    out = {}
    for offload in (False, True):
        cfg, source, bundle, trainer = setup_layout(overrides, f"{run_dir}/{int(offload)}", 3)
        for k in range(3):
            if offload and k == 2:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                out["moved"] = trainer.offload_optimizer()
                out["freed"] = before - torch.cuda.memory_allocated()
                out["reloaded"] = trainer.reload_optimizer()
            trainer.train_step(source.microbatches(k * cfg.training.global_batch_size))
        out[offload] = [p.detach().float().cpu() for c in bundle.model for p in c.parameters()]
        shutdown()
    return out


def test_optimizer_offload_frees_gpu_memory_and_keeps_the_steps(tmp_path):
    out = run_distributed(offload_optimizer_steps, 1, str(tmp_path), timeout=600)[0]
    assert out["moved"] == out["reloaded"] > 0
    assert out["freed"] >= 0.9 * out["moved"]  # the caching allocator may round
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
