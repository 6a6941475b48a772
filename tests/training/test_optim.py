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
