"""Rank bodies for the RL loop tests (module level so that spawn can import them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The demo's model and task, shrunk: 3 iterations of 4 prompts x k=2, held-out evaluation after 2 and 3.
OVERRIDES = ["data.reward=tests.rl.plugin_rewards:starts_with_digit", "rl.iterations=3", "rl.eval_interval=2", "rl.k=2", "rl.prompts_per_iteration=4", "data.eval_size=4",
             "rollout.max_new_tokens=3", "logging.tensorboard=false", "logging.progress_bar=false",
             "checkpoint.save_interval=0", "checkpoint.save_at_end=false"]


class FakeBackend:
    """A RolloutBackend that records the lifecycle calls and answers sample j of a prompt with
    ``digits`` (j odd: reward 1 from ``starts_with_digit``) or the prompt's last two tokens (j even:
    reward 0). It checks the protocol's rules: nothing but resume() while released, and generate()
    only with the trainer's current weights."""

    def __init__(self, trainer, digits):
        self.trainer = trainer
        self.digits = list(digits)
        self.calls = []
        self.released = True  # nothing is allocated before the first resume()
        self.weights_step = None  # the trainer step of the weights last taken

    def generate(self, requests):
        from megatron_kimi.rollout.engine import GenerationResult

        assert not self.released, "generate() while released"
        assert self.weights_step == self.trainer.state.step, "generate() with stale weights"
        self.calls.append("generate")
        out = []
        for r in requests:
            ids = self.digits if int(r.request_id.split("/")[1]) % 2 else list(r.prompt_ids[-2:])
            out.append(GenerationResult(request_id=r.request_id, prompt_ids=list(r.prompt_ids), output_ids=ids,
                                        logprobs=[-1.0] * len(ids), finish_reason="stop"))
        return out

    def update_weights(self, model):
        assert not self.released, "update_weights() while released"
        assert model is self.trainer.model
        self.calls.append("update_weights")
        self.weights_step = self.trainer.state.step

    def release(self):
        assert not self.released, "release() twice"
        self.calls.append("release")
        self.released = True

    def resume(self):
        assert self.released, "resume() while resumed"
        self.calls.append("resume")
        self.released = False

    def close(self):
        self.calls.append("close")


def loop_with_fake_backend(rank, world_size, run_dir):
    """The RL loop (rl/loop.py) on the demo's tiny model, with :class:`FakeBackend` for rollouts."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.commands.rl import build_rl_job
    from megatron_kimi.config import RLConfig, load_config
    from megatron_kimi.rl import loop
    from megatron_kimi.rollout.backend import RolloutBackend
    from megatron_kimi.training.checkpointer import Checkpointer
    from megatron_kimi.training.metrics import MetricsWriter
    from megatron_kimi.training.runtime import initialize, shutdown

    cfg = load_config(str(REPO / "examples/demo/rl.yaml"), [f"run_dir={run_dir}", *OVERRIDES], RLConfig)
    ctx = initialize(cfg)
    try:
        job = build_rl_job(cfg, ctx)
        assert isinstance(job.backend, RolloutBackend)  # the built-in engine implements the protocol
        digits = job.generator.tokenizer("42", add_special_tokens=False)["input_ids"]
        job.backend = fake = FakeBackend(job.trainer, digits)
        reports = []
        step = job.trainer.step

        def recording_step(*args, **kwargs):
            metrics = step(*args, **kwargs)
            reports.append((metrics["loss"], metrics["report"]))
            return metrics

        job.trainer.step = recording_step
        summary, history = loop.train(job, MetricsWriter.from_config(cfg, enabled=False),
                                      Checkpointer.from_config(cfg, job.trainer), Path(run_dir), resumed=False)
        return {"calls": fake.calls, "summary": summary, "history": history, "reports": reports,
                "state": (job.trainer.state.step, job.trainer.state.iteration)}
    finally:
        shutdown()
