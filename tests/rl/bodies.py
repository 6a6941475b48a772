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
    only with the trainer's current weights, weights taken only while awake, and the optimizer state
    on CPU (offloaded) whenever the engine is awake."""

    def __init__(self, trainer, digits):
        self.trainer = trainer
        self.digits = list(digits)
        self.calls = []
        self.asleep = {"weights", "kv_cache"}  # nothing is allocated before the first resume()
        self.weights_step = None  # the trainer step of the weights last taken
        self.weight_version = 0

    def generate(self, requests, on_result=None):
        from megatron_kimi.rollout.engine import GenerationResult

        assert not self.asleep, "generate() while released"
        assert self.trainer.optimizer_offloaded, "generate() with the optimizer state on the GPU"
        assert self.weights_step == self.trainer.state.step, "generate() with stale weights"
        self.calls.append("generate")
        out = []
        for r in requests:
            ids = self.digits if int(r.request_id.split("/")[1]) % 2 else list(r.prompt_ids[-2:])
            out.append(GenerationResult(request_id=r.request_id, prompt_ids=list(r.prompt_ids), output_ids=ids,
                                        logprobs=[-1.0] * len(ids), finish_reason="stop"))
            if on_result is not None:  # streamed, as the built-in engine does
                on_result(out[-1])
        return out

    def update_weights(self, model):
        assert "weights" not in self.asleep, "update_weights() into sleeping weights"
        assert "kv_cache" in self.asleep, "update_weights() with the KV cache allocated (peak memory)"
        assert model is self.trainer.model
        self.calls.append("update_weights")
        self.weights_step = self.trainer.state.step
        self.weight_version += 1

    def release(self):
        assert not self.asleep, "release() twice"
        self.calls.append("release")
        self.asleep = {"weights", "kv_cache"}

    def resume(self, tags=None):
        tags = set(tags or ("weights", "kv_cache"))
        assert tags <= self.asleep, f"resume({sorted(tags)}) while awake"
        assert self.trainer.optimizer_offloaded, "resume() with the optimizer state on the GPU"
        self.calls.append("resume:" + "+".join(sorted(tags)))
        self.asleep -= tags

    def close(self):
        self.calls.append("close")


def loop_with_fake_backend(rank, world_size, run_dir, *overrides):
    """The RL loop (rl/loop.py) on the demo's tiny model, with :class:`FakeBackend` for rollouts
    (``overrides``: more config overrides)."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.commands.rl import build_rl_job
    from megatron_kimi.config import RLConfig, load_config
    from megatron_kimi.rl import loop
    from megatron_kimi.rollout.backend import RolloutBackend
    from megatron_kimi.training.checkpointer import Checkpointer
    from megatron_kimi.training.metrics import MetricsWriter
    from megatron_kimi.training.runtime import initialize, shutdown

    cfg = load_config(str(REPO / "examples/demo/rl.yaml"), [f"run_dir={run_dir}", *OVERRIDES, *overrides], RLConfig)
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
                                      Checkpointer.from_config(cfg, job.trainer), Path(run_dir), resumed_from=None)
        return {"calls": fake.calls, "summary": summary, "history": history, "reports": reports,
                "state": (job.trainer.state.step, job.trainer.state.iteration),
                "offloaded_at_end": job.trainer.optimizer_offloaded}
    finally:
        shutdown()


# ---- partial rollouts ------------------------------------------------------------------------------

PARTIAL = ["data.reward=tests.rl.plugin_rewards:starts_with_digit", "rl.k=2", "rl.prompts_per_iteration=3",
           "data.eval_size=4", "rl.eval_interval=0", "rollout.max_new_tokens=9", "rollout.partial_budget=3",
           "rollout.partial_max_segments=5", "logging.tensorboard=false", "logging.progress_bar=false"]


def partial_greedy_stitched(rank, world_size, run_dir):
    """Frozen (untrained) weights, greedy: responses generated 3 tokens per "iteration" through the
    replay buffer vs the same prompts generated in one go."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.commands.rl import build_rl_job
    from megatron_kimi.config import RLConfig, load_config
    from megatron_kimi.rl.partial import ReplayBuffer
    from megatron_kimi.training.runtime import initialize, shutdown

    cfg = load_config(str(REPO / "examples/demo/rl.yaml"), [f"run_dir={run_dir}", *PARTIAL, "rollout.temperature=0",
                                                             "rollout.repeat_detection=false"], RLConfig)
    ctx = initialize(cfg)
    try:
        job = build_rl_job(cfg, ctx)
        job.backend.resume()
        job.backend.update_weights(job.trainer.model)
        picks = [0, 5, 9]
        whole = job.generator.sample(job.backend, 0, [job.train_prompts[i] for i in picks], cfg.rl.k)
        buffer = ReplayBuffer(cfg.rl.k, cfg.rollout.partial_budget, cfg.rollout.max_new_tokens, 100)
        from megatron_kimi.rl.data import prompt_token_ids

        buffer.add(picks, [prompt_token_ids(job.generator.tokenizer, job.train_prompts[i]) for i in picks])
        it = 0
        while buffer.pending():  # one round per "iteration": versions 0, 1, 2, ...
            job.generator.segment_round(job.backend, it, 0, buffer)
            it += 1
        stitched = [job.generator.from_trajectory(t, job.train_prompts) for g in buffer.pop_complete() for t in g]
        key = lambda s: (s.dataset_index if s.dataset_index is not None else picks[s.prompt_index])  # noqa: E731
        pack = lambda ss: sorted((key(s), s.response_ids, s.sampler_logprobs, s.finish_reason, s.loss_start,  # noqa: E731
                                  s.weight_versions) for s in ss)
        return {"whole": pack(whole.samples), "stitched": pack(stitched), "iterations": it}
    finally:
        shutdown()


class SegmentingFakeBackend(FakeBackend):
    """FakeBackend whose responses have a fixed length per trajectory (1..9 tokens, a hash of its
    request id): with a 3-token budget some finish in one segment and others need three, so groups
    complete in different iterations. Sample j answers with digit tokens (j odd) or letters; the tokens
    generated so far are the trailing run of that token in the request (prompt + partial response)."""

    def __init__(self, trainer, tokenizer):
        super().__init__(trainer, [])
        self.marker = {1: tokenizer("4", add_special_tokens=False)["input_ids"][0],
                       0: tokenizer("x", add_special_tokens=False)["input_ids"][0]}

    def generate(self, requests, on_result=None):
        import zlib

        from megatron_kimi.rollout.engine import GenerationResult

        assert not self.asleep and self.weights_step == self.trainer.state.step
        self.calls.append("generate")
        out = []
        for r in requests:
            tok = self.marker[int(r.request_id.split("/")[1]) % 2]
            done = next((i for i, t in enumerate(reversed(r.prompt_ids)) if t != tok), len(r.prompt_ids))
            target = 1 + zlib.crc32(r.request_id.encode()) % 9
            n = min(target - done, r.params.max_new_tokens)
            out.append(GenerationResult(request_id=r.request_id, prompt_ids=list(r.prompt_ids), output_ids=[tok] * n,
                                        logprobs=[-0.5] * n, finish_reason="stop" if done + n >= target else "length"))
            if on_result is not None:
                on_result(out[-1])
        return out


def partial_loop(rank, world_size, run_dir, iterations, stop_after):
    """The RL loop with partial rollouts and prioritized sampling, checkpointing every iteration; it
    stops (as after a preemption request) once ``stop_after`` iterations are done, resuming from the
    run's checkpoint when there is one. Returns the records and the saved loop state."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.commands.rl import build_rl_job
    from megatron_kimi.config import RLConfig, load_config, to_dict
    from megatron_kimi.rl import loop
    from megatron_kimi.training import checkpoint as ckpt
    from megatron_kimi.training.checkpointer import Checkpointer
    from megatron_kimi.training.metrics import MetricsWriter
    from megatron_kimi.training.runtime import initialize, shutdown

    cfg = load_config(str(REPO / "examples/demo/rl.yaml"),
                      [f"run_dir={run_dir}", *PARTIAL, f"rl.iterations={iterations}", "data.sampling=prioritized",
                       "checkpoint.save_interval=1", "optimizer.lr=3e-3", "optimizer.min_lr=3e-3"], RLConfig)
    ctx = initialize(cfg)
    try:
        job = build_rl_job(cfg, ctx)
        job.backend = SegmentingFakeBackend(job.trainer, job.generator.tokenizer)
        start, _ = ckpt.start_point(Path(run_dir), True, None)
        resumed = start is not None and job.trainer.load(start)
        checkpointer = Checkpointer(job.trainer, Path(run_dir) / "checkpoints", interval=1, extra={"config": to_dict(cfg)},
                                    should_stop=lambda: job.trainer.state.iteration >= stop_after)
        _, history = loop.train(job, MetricsWriter.from_config(cfg, enabled=False), checkpointer, Path(run_dir),
                                start if resumed else None)
        latest = ckpt.start_point(Path(run_dir), True, None)[0]
        return {"history": history, "state": ckpt.read_common(latest)["rl_state"], "stopped": checkpointer.stopped,
                "iteration": job.trainer.state.iteration}
    finally:
        shutdown()
