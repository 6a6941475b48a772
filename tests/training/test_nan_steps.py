"""A NaN/inf loss or gradient skips the step (nothing changes), is counted, and a streak stops the run."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed


def _poison(forward_step, how):
    """The forward step with its output poisoned: ``"loss"`` makes the loss NaN, ``"grad"`` keeps the loss
    finite but makes the gradient that flows back through the output infinite."""
    import torch

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def step(data_iterator, model):
        out, loss_func = forward_step(data_iterator, model)
        return (out * float("nan") if how == "loss" else InfGrad.apply(out)), loss_func

    return step


def nan_steps_body(rank, world_size, run_dir):
    import math

    import torch

    from megatron_kimi.training.runtime import shutdown
    from megatron_kimi.training.trainer import NonFiniteLossError
    from tests.parallel.harness import setup_layout

    cfg, source, bundle, trainer = setup_layout([], run_dir, 20)
    trainer.max_consecutive_nan_steps = 3
    clean = trainer.forward_step_func
    gbs = cfg.training.global_batch_size

    def snapshot():
        params = [p.detach().clone() for c in bundle.model for p in c.parameters()]
        opt = [v.detach().clone() for o in getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
               for st in o.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return params, opt, bundle.scheduler.num_steps

    def same(a, b):
        return a[2] == b[2] and all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))

    def step(k, how=None):
        trainer.forward_step_func = clean if how is None else _poison(clean, how)
        return trainer.train_step(source.microbatches(k * gbs))

    out = {}
    try:
        first = step(0)
        out["first"] = (first["nan_skipped"], math.isfinite(first["loss"]), first["skipped"])
        out["first_report"] = (first["loss"], first["loss_tokens"], first["report"])
        for how in ("loss", "grad"):
            before = snapshot()
            m = step(1, how)
            out[how] = {"unchanged": same(before, snapshot()), "nan_skipped": m["nan_skipped"],
                        "skipped": m["skipped"], "nan_steps": m["nan_steps"], "loss_finite": math.isfinite(m["loss"]),
                        "streak": trainer.nan_streak}
            good = step(2)  # a finite step resets the streak and does update
            out[how]["next_updates"] = not same(before, snapshot()) and good["nan_skipped"] == 0
            out[how]["streak_after_good"] = trainer.nan_streak
        streak = [step(3, "loss")["nan_skipped"], step(4, "grad")["nan_skipped"]]
        try:
            step(5, "loss")
            out["error"] = None
        except NonFiniteLossError as e:
            out["error"] = str(e)
        out["streak"] = streak
        out["nan_steps"] = trainer.state.nan_steps
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    return run_distributed(nan_steps_body, 1, str(tmp_path_factory.mktemp("nan") / "run"), timeout=240)[0]


def test_a_normal_step_is_not_flagged(nan_run):
    assert nan_run["first"] == (0, True, 0)


def test_the_step_report_is_named(nan_run):
    loss, tokens, report = nan_run["first_report"]
    assert set(report) == {"loss_sum", "loss_count"}  # lm_step.REPORT_FIELDS["lm_loss"]
    assert report["loss_count"] == tokens > 0 and loss == report["loss_sum"] / report["loss_count"]


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_non_finite_step_changes_nothing_and_is_counted(nan_run, how):
    r = nan_run[how]
    assert r["unchanged"], "params, Adam state or the LR schedule moved on a skipped step"
    assert r["nan_skipped"] == 1 and r["skipped"] == 1 and r["streak"] == 1
    assert r["loss_finite"] is (how == "grad")  # the grad case: finite loss, infinite gradient
    assert r["next_updates"] and r["streak_after_good"] == 0
    assert r["nan_steps"] == {"loss": 1, "grad": 2}[how]


def test_a_streak_of_non_finite_steps_stops_with_a_clear_error(nan_run):
    assert nan_run["streak"] == [1, 1]
    msg = nan_run["error"]
    assert msg is not None, "the third non-finite step in a row did not stop the run"
    assert "3 optimizer steps in a row" in msg and "training.max_consecutive_nan_steps=3" in msg
    assert "consumed_samples=" in msg
    assert nan_run["nan_steps"] == 5
