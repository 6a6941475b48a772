"""Rank bodies for the upstream pins (module-level so that spawn can import them).

Every body returns plain, picklable observations; the assertions live in test_upstream_pins.py.
"""

from __future__ import annotations

import traceback

import torch

from tests.parallel.harness import BASE, train_layout

TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")
MISSING = "<missing>"


def _exc(e: BaseException) -> dict:
    return {"type": type(e).__name__, "msg": str(e), "args": [repr(a) for a in e.args],
            "tb": traceback.format_exc()}


# ---- pin 2: perform_initialization and the tensor-parallel attributes -------------------------

def parallel_layer_attrs(rank, world_size):
    """Build TP layers with perform_initialization False/True at TP=world_size; read the attributes.

    Also asks ``param_is_not_tensor_parallel_duplicate`` (what the grad norm uses to skip
    duplicates) about each weight, so the consequence on TP rank > 0 is observed too.
    """
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        param_is_not_tensor_parallel_duplicate,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_kimi.platform.launch import detect_env, init_process_group

    init_process_group(detect_env())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model_parallel_cuda_manual_seed(1234)
    try:
        out = {}
        for perform in (False, True):
            cfg = TransformerConfig(
                num_layers=1, hidden_size=16, num_attention_heads=2,
                tensor_model_parallel_size=world_size,
                perform_initialization=perform, use_cpu_initialization=True,
            )
            layers = {
                "ColumnParallelLinear": ColumnParallelLinear(
                    16, 32, config=cfg, init_method=cfg.init_method, bias=False, gather_output=False),
                "RowParallelLinear": RowParallelLinear(
                    32, 16, config=cfg, init_method=cfg.output_layer_init_method, bias=False,
                    input_is_parallel=True, skip_bias_add=False),
                "VocabParallelEmbedding": VocabParallelEmbedding(
                    64, 16, init_method=cfg.init_method, config=cfg),
            }
            for name, layer in layers.items():
                w = layer.weight
                out[(perform, name)] = {
                    "attrs": {a: getattr(w, a, MISSING) for a in TP_ATTRS},
                    "counted_in_grad_norm": bool(param_is_not_tensor_parallel_duplicate(w)),
                }
        from megatron_kimi.config import ModelConfig, ParallelConfig, PrecisionConfig
        from megatron_kimi.model.builder import transformer_config

        ours = transformer_config(ModelConfig(), ParallelConfig(), PrecisionConfig())
        return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "layers": out,
                "builder_perform_initialization": ours.perform_initialization}
    finally:
        parallel_state.destroy_model_parallel()


# ---- pin 3: batch_p2p_comm on gloo --------------------------------------------------------------

def p2p_layout(rank, world_size, overrides, run_dir, force_batched):
    """One training step at ``overrides`` (via the harness); optionally force batch_p2p_comm=True.

    Reports the step-1 record, the ``batch_p2p_comm`` our builder chose for the run (before any
    forcing) and for the default config tree.
    """
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_kimi.model import builder
    from megatron_kimi.training import runtime

    seen = []
    original = builder.transformer_config

    def wrapped(*args, **kwargs):
        cfg = original(*args, **kwargs)
        seen.append(cfg.batch_p2p_comm)
        if force_batched:
            cfg.batch_p2p_comm = True
        return cfg

    # runtime imported the function by name: patch the name it calls (and the builder's, for others)
    runtime.transformer_config = wrapped
    builder.transformer_config = wrapped
    try:
        default_cfg = original(ModelConfig(), ParallelConfig(), PrecisionConfig())
        res = train_layout(rank, world_size, overrides, 1, run_dir, False)
    finally:
        runtime.transformer_config = original
        builder.transformer_config = original
    return {
        "record": res["records"][0],
        "builder_batch_p2p_comm": seen,
        "default_batch_p2p_comm": default_cfg.batch_p2p_comm,
        "cuda_available": torch.cuda.is_available(),
    }


# ---- pins (a)-(d): distributed-optimizer checkpoints ------------------------------------------

def _leaves(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _dist_leaves(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in _leaves(optimizer) if isinstance(o, DistributedOptimizer)]


def _step_tensors(optimizer):
    """All per-param ``step`` tensors of the inner torch optimizers (one list per leaf)."""
    return [[s["step"] for s in o.optimizer.state.values() if "step" in s] for o in _dist_leaves(optimizer)]


def _step_summary(optimizer) -> dict:
    lists = _step_tensors(optimizer)
    flat = [t for lst in lists for t in lst]
    return {
        "n_states": len(flat),
        "n_distinct_objects": len({id(t) for t in flat}),
        "n_distinct_per_leaf": [len({id(t) for t in lst}) for lst in lists],
        "values": sorted({float(t) for t in flat}),
    }


def _moments(optimizer) -> list:
    out = []
    for o in _dist_leaves(optimizer):
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                st = o.optimizer.state.get(p, {})
                out.append({k: st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq") if k in st})
                out[-1]["param"] = p.detach().clone()
    return out


def _clobber(optimizer) -> None:
    """Overwrite the moments and params that a load must restore (so a no-op load is caught)."""
    with torch.no_grad():
        for o in _dist_leaves(optimizer):
            for group in o.optimizer.param_groups:
                for p in group["params"]:
                    st = o.optimizer.state.get(p, {})
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in st:
                            st[k].fill_(123.0)
                    p.fill_(-7.0)


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def distopt_observations(rank, world_size, run_dir):
    """Reproduce (a)-(d) with a tiny model and the distributed optimizer at DP=world_size."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    import types
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_kimi.commands.train import prepare_corpus
    from megatron_kimi.config import load_config
    from megatron_kimi.data.corpus import SequenceSampler
    from megatron_kimi.data.lm_source import LMBatchSource
    from megatron_kimi.megatron_fixes import dist_optimizer_checkpoint as fix
    from megatron_kimi.training import checkpoint as ckpt
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    run_dir = Path(run_dir)
    cfg = load_config(None, BASE + ["parallel.distributed_optimizer=true", f"run_dir={run_dir}", "training.steps=1"])
    ctx = initialize(cfg)
    obs: dict = {"dp": parallel_state.get_data_parallel_world_size()}
    try:
        tokenizer, corpus = prepare_corpus(cfg, ctx.is_rank0)
        t = cfg.training

        # (b) a bundle that never stepped: building the *load* state dict
        fresh = build_training_bundle(cfg, len(tokenizer), 1)
        obs["optimizer_types"] = [type(o).__name__ for o in _leaves(fresh.optimizer)]
        obs["b_state_len_before"] = [len(o.optimizer.state) for o in _dist_leaves(fresh.optimizer)]
        model_sd = ckpt._model_sharded_sd(fresh.model)["model"]
        try:
            fresh.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=ckpt._OPTIM_METADATA)
            obs["b_plain"] = None
        except Exception as e:  # noqa: BLE001 - the observation
            obs["b_plain"] = _exc(e)
        fix.ensure_state_initialized(fresh.optimizer)
        try:
            model_sd = ckpt._model_sharded_sd(fresh.model)["model"]
            fresh.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=ckpt._OPTIM_METADATA)
            obs["b_fixed"] = None
        except Exception as e:  # noqa: BLE001
            obs["b_fixed"] = _exc(e)
        del fresh

        # one real training step on another bundle
        b = build_training_bundle(cfg, len(tokenizer), 1)
        source = LMBatchSource(corpus, SequenceSampler(len(corpus), t.seed), t.global_batch_size,
                               t.micro_batch_size, parallel_state.get_data_parallel_rank(), ctx.dp_size)
        trainer = Trainer(b, lm_forward_step, t.seq_length, t.micro_batch_size)
        obs["record"] = trainer.train_step(source.microbatches(0))
        obs["steps_after_train"] = _step_summary(b.optimizer)

        # (a) the default sharding type (fully_sharded_model_space)
        default_dir = run_dir / "default_format"
        if rank == 0:
            default_dir.mkdir()
        dist.barrier()
        where = "optimizer.sharded_state_dict"
        try:
            model_sd = ckpt._model_sharded_sd(b.model)["model"]
            sd = {"optimizer": b.optimizer.sharded_state_dict(model_sd)}
            where = "dist_checkpointing.save"
            dist_checkpointing.save(sd, str(default_dir))
            obs["a_default"] = None
        except Exception as e:  # noqa: BLE001
            obs["a_default"] = dict(_exc(e), where=where)
        dist.barrier()

        # our save (fully_reshardable), then load the tensors back the way checkpoint.load does
        saved_moments = _moments(b.optimizer)
        saved_steps = _step_summary(b.optimizer)["values"]
        root = run_dir / "checkpoints"
        final = ckpt.save(root, 1, b.model, b.optimizer, b.scheduler, {"step": 1})
        obs["saved_dir_ok"] = final.is_dir()

        def read_back():
            sd = ckpt._state_dict(b.model, b.optimizer, None, {}, {}, is_loading=True, with_rng=False)
            for k in ("train_state", "layout", "format_version", "contents", "optimizer_kind"):
                sd.pop(k, None)  # the non-sharded entries, as checkpoint.load drops them
            return dist_checkpointing.load(sd, str(final))

        # (c) plain load_state_dict
        loaded = read_back()
        try:
            b.optimizer.load_state_dict(loaded["optimizer"])
            obs["c_plain"] = None
        except Exception as e:  # noqa: BLE001
            obs["c_plain"] = _exc(e)
        # ... and ours, into clobbered state
        loaded = read_back()
        _clobber(b.optimizer)
        try:
            fix.load_optimizer_state(b.optimizer, loaded["optimizer"])
            obs["c_fixed"] = None
        except Exception as e:  # noqa: BLE001
            obs["c_fixed"] = _exc(e)
        obs["c_fixed_restored"] = _same(saved_moments, _moments(b.optimizer))
        obs["c_fixed_steps"] = _step_summary(b.optimizer)
        obs["saved_step_values"] = saved_steps

        # (d) only (c) fixed: upstream load_state_dict with our key-intersection copy
        loaded = read_back()
        fix.unshare_step_tensors(b.optimizer)  # start from distinct tensors (read_back may alias)
        obs["d_before"] = _step_summary(b.optimizer)
        _clobber(b.optimizer)
        patched = _dist_leaves(b.optimizer)
        for o in patched:
            o._set_main_param_and_optimizer_states = types.MethodType(fix._set_common_keys, o)
        try:
            b.optimizer.load_state_dict(loaded["optimizer"])
        finally:
            for o in patched:
                del o._set_main_param_and_optimizer_states
        obs["d_restored"] = _same(saved_moments, _moments(b.optimizer))
        obs["d_aliased"] = _step_summary(b.optimizer)
        # the harm: one torch Adam step on the aliased state advances ``step`` once per param
        inner = [o.optimizer for o in patched]
        steps_before = [s["step"].clone() for s in inner[0].state.values()]
        for opt in inner:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad()
        obs["d_after_one_step"] = {"before": sorted({float(x) for x in steps_before}),
                                   "after": _step_summary(b.optimizer)["values"]}
        # the fix for (d)
        loaded = read_back()
        for o in patched:
            o._set_main_param_and_optimizer_states = types.MethodType(fix._set_common_keys, o)
        try:
            b.optimizer.load_state_dict(loaded["optimizer"])
        finally:
            for o in patched:
                del o._set_main_param_and_optimizer_states
        obs["d_shared_count"] = fix.unshare_step_tensors(b.optimizer)
        obs["d_unshared"] = _step_summary(b.optimizer)
        return obs
    finally:
        shutdown()
