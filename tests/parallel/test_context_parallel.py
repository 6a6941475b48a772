"""Context parallelism on packed THD batches matches CP=1 (fp32): losses, grad norms, grads.

The packs hold several samples of uneven lengths, some shorter than 2*CP (so padded); RoPE must
then use each token's position within its own sample on every CP rank. Two layouts also turn on
activation recomputation (full / selective), which must not change the numbers either.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_kimi.model.sharding import assemble
from megatron_kimi.parallel import context
from megatron_kimi.parallel.context import host_bounds, zigzag_indices
from tests.dist import run_distributed
from tests.parallel.cp_harness import cp_train

STEPS = 2


def test_zigzag_split_is_load_balanced_and_covers_every_token():
    cu = (0, 4, 12, 28)  # samples of 4, 8, 16 tokens (multiples of 2*CP=4)
    parts = [zigzag_indices(cu, 2, r) for r in range(2)]
    assert parts[0].tolist() == [0, 3, 4, 5, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27]
    assert sorted(torch.cat(parts).tolist()) == list(range(28))
    with pytest.raises(ValueError, match="multiple of 2\\*CP=4"):
        zigzag_indices((0, 6), 2, 0)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(cp_train, 1, [], STEPS, timeout=240)[0]


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        scale = a[name].abs().max().item() or 1.0
        worst = max(worst, (a[name] - b[name]).abs().max().item() / scale)
    return worst


LAYOUTS = {
    "cp2_full_recompute": (2, ["parallel.context=2", "recompute.granularity=full"]),
    "cp2_tp2_sp": (4, ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "cp2_pp2_selective_recompute": (4, ["parallel.context=2", "parallel.pipeline=2", "recompute.granularity=selective"]),
    "cp2_dp2": (4, ["parallel.context=2"]),
}


def test_host_bounds_copies_once_per_tensor_version(monkeypatch):
    """Each layer's CP attention asks for the same cu_seqlens on the host: one device copy per tensor."""
    copies, before = [], len(context._HOST_BOUNDS)
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(1) or real(t))
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert host_bounds(cu) == host_bounds(cu) == (0, 4, 12) and len(copies) == 1
    cu[2] = 16  # edited in place: copied again
    assert host_bounds(cu) == (0, 4, 16) and len(copies) == 2
    assert host_bounds(cu.clone()) == (0, 4, 16) and len(copies) == 3
    del cu
    assert len(context._HOST_BOUNDS) == before  # entries die with their tensors


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_cp1(name, reference, tmp_path):
    world, overrides = LAYOUTS[name]
    ref = reference
    results = run_distributed(cp_train, world, overrides, STEPS, timeout=400)
    for rank, res in enumerate(results):
        for step, (a, b) in enumerate(zip(ref["records"], res["records"])):
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (name, rank, step, a["loss"], b["loss"])
            assert a["loss_tokens"] == b["loss_tokens"]  # token counts reduced over CP (and DP)
    for a, b in zip(ref["records"], results[0]["records"]):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["grad_norm"], b["grad_norm"])
    full_ref = assemble([ref["grads"]])
    full = assemble([r["grads"] for r in results if r["grads"] is not None])
    assert _max_rel(full_ref, full) < 1e-5
