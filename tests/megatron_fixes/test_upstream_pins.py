"""Pins for every Megatron-Core workaround in megatron_kimi/megatron_fixes (see its README.md).

Two kinds of test per workaround:

* ``test_pin_*``: the upstream behaviour the workaround exists for is still there. When one of
  these FAILS after a megatron-core upgrade, upstream changed: re-check the behaviour and drop
  (or adapt) the workaround named in the docstring, then delete the pin.
* ``test_fix_*``: the workaround itself works.

Megatron's global state never enters the pytest process: everything runs on spawned ranks
(tests/dist.py), one run per module-scoped fixture, returning plain observations.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest

from tests.dist import run_distributed
from tests.megatron_fixes import bodies

LAYERS = ("ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding")
PP2_VPP2 = ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]


# ============ (2) perform_initialization=True: tensor-parallel attributes ======================

@pytest.fixture(scope="module")
def tp_layers():
    """Both TP ranks of a TP=2 group: layers built with perform_initialization False and True."""
    return run_distributed(bodies.parallel_layer_attrs, 2, timeout=240)


def test_pin_tp_attributes_missing_without_perform_initialization(tp_layers):
    """Guards ``perform_initialization=True`` in model/builder.py (megatron_fixes/README.md, 2).

    megatron-core 0.16.1 sets ``tensor_model_parallel``/``partition_dim``/``partition_stride`` only
    inside its weight-init functions. If this fails, upstream now sets them regardless of
    perform_initialization: re-check and drop the requirement (Megatron's init could then be skipped,
    megatron_kimi.model.init overwrites the weights anyway).
    """
    for res in tp_layers:
        for name in LAYERS:
            attrs = res["layers"][(False, name)]["attrs"]
            assert all(v == bodies.MISSING for v in attrs.values()), (res["tp_rank"], name, attrs)


def test_pin_tp_shards_dropped_from_grad_norm_without_perform_initialization(tp_layers):
    """Guards ``perform_initialization=True`` (README 2): the consequence of the missing attributes.

    ``param_is_not_tensor_parallel_duplicate`` treats an attribute-less TP shard as a duplicate on
    TP rank > 0, so the grad norm (and clipping) skips it. If this fails, upstream changed how
    duplicates are detected: re-check and drop the requirement.
    """
    by_rank = {r["tp_rank"]: r for r in tp_layers}
    for name in LAYERS:
        assert by_rank[0]["layers"][(False, name)]["counted_in_grad_norm"] is True, name
        assert by_rank[1]["layers"][(False, name)]["counted_in_grad_norm"] is False, name


def test_fix_perform_initialization_sets_tp_attributes(tp_layers):
    """The workaround (README 2): with perform_initialization=True every TP shard has its attributes
    and counts in the grad norm on every TP rank; our builder asks for it."""
    expected_dim = {"ColumnParallelLinear": 0, "RowParallelLinear": 1, "VocabParallelEmbedding": 0}
    for res in tp_layers:
        assert res["builder_perform_initialization"] is True
        for name in LAYERS:
            layer = res["layers"][(True, name)]
            assert layer["attrs"] == {"tensor_model_parallel": True, "partition_dim": expected_dim[name],
                                      "partition_stride": 1}, (res["tp_rank"], name)
            assert layer["counted_in_grad_norm"] is True, (res["tp_rank"], name)


# ============ (3) batch_p2p_comm=False on gloo =================================================

def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_pin_batched_p2p_posting_order():
    """Guards ``batch_p2p_comm=not on_cpu`` in model/builder.py (README 3), source level.

    ``_batched_p2p_ops`` posts send_prev, recv_prev, send_next, recv_next into one
    ``batch_isend_irecv``; with prev == next (PP=2 + virtual stages) gloo pairs the two messages of
    one rank pair by posting order and swaps them. If this fails, upstream changed the batched path:
    re-check with test_pin_batched_p2p_swaps_messages_on_gloo and drop the workaround if fixed.
    """
    from megatron.core.pipeline_parallel import p2p_communication

    src = _squash(inspect.getsource(p2p_communication._batched_p2p_ops))
    posts = [
        "torch.distributed.isend,tensor_send_prev,prev_pipeline_rank",
        "torch.distributed.irecv,tensor_recv_prev,prev_pipeline_rank",
        "torch.distributed.isend,tensor_send_next,next_pipeline_rank",
        "torch.distributed.irecv,tensor_recv_next,next_pipeline_rank",
        "torch.distributed.batch_isend_irecv(ops)",
    ]
    positions = [src.find(p) for p in posts]
    assert all(p >= 0 for p in positions), dict(zip(posts, positions))
    assert positions == sorted(positions), dict(zip(posts, positions))
    for op in ("send_prev_op", "recv_prev_op", "send_next_op", "recv_next_op"):
        assert f"ops.append({op})" in src, op


@pytest.fixture(scope="module")
def p2p_runs(tmp_path_factory):
    """Step 1 at 1 rank, and at PP=2 x VPP=2 with the builder's default and with batched p2p forced."""
    ref = run_distributed(bodies.p2p_layout, 1, [], str(tmp_path_factory.mktemp("p2p_ref")), False,
                          timeout=240)
    default = run_distributed(bodies.p2p_layout, 2, PP2_VPP2, str(tmp_path_factory.mktemp("p2p_default")),
                              False, timeout=240)
    forced = run_distributed(bodies.p2p_layout, 2, PP2_VPP2, str(tmp_path_factory.mktemp("p2p_forced")),
                             True, timeout=240)
    return {"ref": ref[0], "default": default, "forced": forced}


def test_fix_builder_disables_batch_p2p_comm_on_cpu(p2p_runs):
    """The workaround (README 3): on a CPU/gloo rank our builder sets batch_p2p_comm=False, both for
    the default config tree and for the config the PP=2 x VPP=2 run was built with."""
    for res in p2p_runs["default"]:
        assert res["cuda_available"] is False
        assert res["default_batch_p2p_comm"] is False
        assert res["builder_batch_p2p_comm"] == [False]


def test_pin_batched_p2p_swaps_messages_on_gloo(p2p_runs):
    """Guards ``batch_p2p_comm=not on_cpu`` (README 3), behaviour: batched p2p on gloo at PP=2 x VPP=2
    trains differently from the single process. If this fails, upstream (or torch's gloo) no longer
    mixes up the messages: drop the workaround (and the source pin above)."""
    ref = p2p_runs["ref"]["record"]
    for res in p2p_runs["forced"]:
        rec = res["record"]
        assert not math.isclose(rec["loss"], ref["loss"], rel_tol=1e-5), (rec, ref)
        assert not math.isclose(rec["grad_norm"], ref["grad_norm"], rel_tol=1e-4), (rec, ref)


def test_fix_unbatched_p2p_matches_single_process(p2p_runs):
    """The workaround (README 3): with the builder's default the interleaved step matches 1 rank."""
    ref = p2p_runs["ref"]["record"]
    for res in p2p_runs["default"]:
        rec = res["record"]
        assert math.isclose(rec["loss"], ref["loss"], rel_tol=1e-5), (rec, ref)
        assert math.isclose(rec["grad_norm"], ref["grad_norm"], rel_tol=1e-4), (rec, ref)


# ============ (1) distributed-optimizer checkpoints, (a)-(d) ===================================
# One rank is enough: every one of (a)-(d) reproduces at DP=1 exactly as at DP=2 (checked), and the
# DistributedOptimizer code paths involved do not depend on the DP size.

@pytest.fixture(scope="module")
def distopt(tmp_path_factory):
    return run_distributed(bodies.distopt_observations, 1, str(tmp_path_factory.mktemp("distopt")),
                           timeout=240)[0]


def _fmt(exc):
    return None if exc is None else {k: v for k, v in exc.items() if k != "tb"}


def test_distopt_setup(distopt):
    """Sanity: the pins below really ran on a DistributedOptimizer that trained a step."""
    assert distopt["optimizer_types"] == ["DistributedOptimizer"]
    assert distopt["record"]["skipped"] == 0 and math.isfinite(distopt["record"]["loss"])
    assert distopt["steps_after_train"]["values"] == [1.0]


def test_pin_a_default_sharding_type_rejects_flattened_range(distopt):
    """Guards the ``fully_reshardable`` metadata in training/checkpoint.py (README 1a).

    With the default ``fully_sharded_model_space`` the optimizer's sharded state dict uses
    ShardedTensors with ``flattened_range``, which dist_checkpointing rejects (in 0.16.1 already when
    the ShardedTensor is built, i.e. inside ``optimizer.sharded_state_dict``). If this fails, the
    default format saves again: re-check and drop the forced metadata (or keep it deliberately).
    """
    exc = distopt["a_default"]
    assert exc is not None, "default sharding type saved fine"
    assert "flattened_range" in exc["msg"], _fmt(exc)


def test_fix_a_fully_reshardable_saves(distopt):
    """The workaround (README 1a): training/checkpoint.save (fully_reshardable) writes a checkpoint."""
    assert distopt["saved_dir_ok"] is True


def test_pin_b_fresh_optimizer_cannot_build_load_state_dict(distopt):
    """Guards ``ensure_state_initialized`` (README 1b): a never-stepped torch Adam has no state and
    ``sharded_state_dict(is_loading=True)`` asserts on it. If this fails, upstream handles a fresh
    optimizer: re-check and drop ensure_state_initialized."""
    assert distopt["b_state_len_before"] == [0]
    exc = distopt["b_plain"]
    assert exc is not None and exc["type"] == "AssertionError", _fmt(exc)


def test_fix_b_ensure_state_initialized(distopt):
    """The workaround (README 1b): after ensure_state_initialized the load state dict builds."""
    assert distopt["b_fixed"] is None, distopt["b_fixed"] and distopt["b_fixed"]["tb"]


def test_pin_c_plain_load_state_dict_keyerror_step(distopt):
    """Guards ``load_optimizer_state``'s key-intersection copy (README 1c): upstream's
    ``_set_main_param_and_optimizer_states`` iterates the destination keys, which include torch
    Adam's per-param ``step`` that the checkpoint does not hold. If this fails, upstream copies only
    what it loaded: re-check and drop ``_set_common_keys``."""
    exc = distopt["c_plain"]
    assert exc is not None and exc["type"] == "KeyError" and exc["args"] == ["'step'"], _fmt(exc)


def test_fix_c_load_optimizer_state_restores(distopt):
    """The workaround (README 1c+d): load_optimizer_state loads into overwritten state and restores
    params and both Adam moments exactly, with distinct step tensors of the saved value."""
    assert distopt["c_fixed"] is None, distopt["c_fixed"] and distopt["c_fixed"]["tb"]
    assert distopt["c_fixed_restored"] is True
    steps = distopt["c_fixed_steps"]
    assert steps["n_distinct_objects"] == steps["n_states"] > 1
    assert steps["values"] == distopt["saved_step_values"]


def test_pin_d_load_state_dict_aliases_step_tensors(distopt):
    """Guards ``unshare_step_tensors`` (README 1d): with only (c) fixed, upstream ``load_state_dict``
    puts ONE ``step`` tensor into every param's state. If this fails, upstream gives each param its
    own: re-check and drop unshare_step_tensors."""
    assert distopt["d_before"]["n_distinct_objects"] == distopt["d_before"]["n_states"] > 1
    assert distopt["d_restored"] is True  # (c) alone loads the tensors ...
    aliased = distopt["d_aliased"]
    assert aliased["n_states"] > 1 and aliased["n_distinct_per_leaf"] == [1]  # ... but shares step


def test_pin_d_aliased_step_advances_once_per_param(distopt):
    """Guards ``unshare_step_tensors`` (README 1d), the harm: torch Adam increments the shared step in
    place once per param, so one step after a resume leaves it at saved + n_params, not saved + 1.
    If this fails, torch/upstream no longer advance a shared step per param: re-check (d)."""
    n = distopt["d_aliased"]["n_states"]
    seen = distopt["d_after_one_step"]
    assert seen["before"] == [1.0]
    assert seen["after"] == [1.0 + n], (seen, n)


def test_fix_d_unshare_step_tensors(distopt):
    """The workaround (README 1d): unshare_step_tensors gives every param its own step tensor with the
    same value, and reports how many were shared."""
    unshared = distopt["d_unshared"]
    assert unshared["n_distinct_objects"] == unshared["n_states"] > 1
    assert unshared["values"] == distopt["saved_step_values"]
    assert distopt["d_shared_count"] == unshared["n_states"] - 1
