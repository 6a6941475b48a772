"""training/optim.py: torch AdamW switched to its fused kernel (what build_optimizer does on CUDA) takes
the same steps as the multi-tensor path Megatron falls back to without TE/apex.

torch's fused AdamW runs on CPU too, so the switch itself is checked here on a real Megatron optimizer
(plain and distributed): parameters after 3 steps agree to fp32 rounding.
"""

from __future__ import annotations

import pytest

from tests.dist import run_distributed


def fused_vs_foreach_body(rank, world_size, run_dir, overrides):
    import torch

    from megatron_kimi.training.optim import use_fused_torch_adam
    from megatron_kimi.training.runtime import shutdown
    from tests.parallel.harness import setup_layout

    out = {}
    try:
        for fused in (False, True):
            cfg, source, bundle, trainer = setup_layout(overrides, f"{run_dir}/{int(fused)}", 3)
            if fused:
                out["switched"] = use_fused_torch_adam(bundle.optimizer)
                out["flags"] = [g["fused"] for o in getattr(bundle.optimizer, "chained_optimizers",
                                                             [bundle.optimizer]) for g in o.optimizer.param_groups]
            for k in range(3):
                trainer.train_step(source.microbatches(k * cfg.training.global_batch_size))
            out[fused] = [p.detach().clone() for c in bundle.model for p in c.parameters()]
            shutdown()
    finally:
        shutdown()
    return out


@pytest.mark.parametrize("overrides", [[], ["parallel.distributed_optimizer=true"]], ids=["plain", "dist_opt"])
def test_fused_adam_takes_the_same_steps(tmp_path, overrides):
    out = run_distributed(fused_vs_foreach_body, 1, str(tmp_path), overrides, timeout=240)[0]
    assert out["switched"] >= 1 and out["flags"] and all(out["flags"])
    for a, b in zip(out[False], out[True]):
        torch = pytest.importorskip("torch")
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))


def offload_round_trip_body(rank, world_size, run_dir, overrides):
    """3 steps; between steps 1 and 2 the optimizer state goes "away" and back through copies (what the
    CPU offload of a colocated rollout does, with a clone standing in for the device copies)."""
    import torch

    from megatron_kimi.training.optim import inner_optimizers, move_optimizer_state
    from megatron_kimi.training.runtime import shutdown
    from tests.parallel.harness import setup_layout

    out = {}
    try:
        for offload in (False, True):
            cfg, source, bundle, trainer = setup_layout(overrides, f"{run_dir}/{int(offload)}", 3)
            for k in range(3):
                if offload and k == 1:
                    # the tensors themselves (kept alive: a freed tensor's id may be reused)
                    before = [v for o in inner_optimizers(bundle.optimizer) for st in o.state.values()
                              for v in st.values() if isinstance(v, torch.Tensor)]
                    out["bytes_out"] = move_optimizer_state(bundle.optimizer, lambda t: t.clone())
                    out["bytes_back"] = move_optimizer_state(bundle.optimizer, lambda t: t.clone())
                    after = [v for o in inner_optimizers(bundle.optimizer) for st in o.state.values()
                             for v in st.values() if isinstance(v, torch.Tensor)]
                    out["replaced"] = len(before) == len(after) > 0 and not {id(v) for v in before} & {
                        id(v) for v in after}
                    out["n_params"] = sum(p.numel() for o in inner_optimizers(bundle.optimizer)
                                          for g in o.param_groups for p in g["params"])
                trainer.train_step(source.microbatches(k * cfg.training.global_batch_size))
            out[offload] = [p.detach().clone() for c in bundle.model for p in c.parameters()]
            shutdown()
    finally:
        shutdown()
    return out


@pytest.mark.parametrize("overrides", [[], ["parallel.distributed_optimizer=true"]], ids=["plain", "dist_opt"])
def test_optimizer_state_round_trip_takes_the_same_steps(tmp_path, overrides):
    # The offload must move the moments (new tensors), count them (2 fp32 moments per optimized value,
    # plus the step counters), and leave the parameters linked: with the distributed optimizer over
    # fp32 weights the optimizer's parameters are views of the model's, and moving them would freeze
    # the model.
    torch = pytest.importorskip("torch")
    out = run_distributed(offload_round_trip_body, 1, str(tmp_path), overrides, timeout=240)[0]
    assert out["replaced"]
    assert out["bytes_out"] == out["bytes_back"] >= 8 * out["n_params"]
    assert out["bytes_out"] < 8 * out["n_params"] + 1024  # moments + small step counters, nothing else
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
