"""A short `megatron-kimi rl` run on CPU where the reward rises; reward shaping on hand cases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.dist import run_cli

from megatron_kimi.rl.loop import shape_rewards
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rl_raises_the_reward_of_a_plugged_in_verifier(tmp_path):
    """From a random init, P(the answer starts with a digit) ~ 10/128: mirror descent must raise it."""
    run = tmp_path / "rl"
    cmd = ["rl", "examples/demo/rl.yaml", f"run_dir={run}",
           "data.reward=tests.rl.plugin_rewards:starts_with_digit", "rl.iterations=12", "rl.eval_interval=0",
           "data.eval_size=64", "rollout.max_new_tokens=3", "optimizer.lr=3e-3", "optimizer.min_lr=3e-3",
           "rl.prompts_per_iteration=16", "logging.tensorboard=false"]
    out = run_cli(cmd, cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == list(range(1, 13))
    for key in ("reward", "accuracy", "response_length_mean", "response_length_max", "truncation_rate",
                "repeat_rate", "log_ratio", "logprob_mismatch", "time_rollout_s", "time_scoring_s",
                "time_train_s", "rollout_tokens_per_s", "loss", "grad_norm"):
        assert key in recs[0], key
    assert max(r["logprob_mismatch"] for r in recs) < 1e-4  # sampler and trainer agree (fp32)
    assert all(0.0 < r["entropy"] <= math.log(128) + 1e-6 for r in recs)  # raw policy over the padded vocab
    assert recs[-1]["entropy"] < recs[0]["entropy"]  # the policy sharpens
    early = sum(r["reward"] for r in recs[:3]) / 3
    late = sum(r["reward"] for r in recs[-3:]) / 3
    assert late > early + 0.2, [round(r["reward"], 3) for r in recs]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["accuracy"] > summary["before"]["accuracy"] + 0.2, summary
    assert (run / "rl_curves.png").stat().st_size > 1000
    assert "rl: held-out accuracy" in out.stdout.strip().splitlines()[-1]


def _sample(i, n, correct, task, finish="stop"):
    return Sample(prompt_index=0, prompt=Prompt("q"), prompt_ids=[1], response_ids=list(range(n)), response="",
                  sampler_logprobs=[0.0] * n, finish_reason=finish, correct=correct, reward_parts={"task": task})


class _Cfg:
    class rl:
        length_penalty_weight = 1.0
        length_penalty_warmup = 2
        repeat_penalty = -1.0


def test_shaping_adds_length_and_repeat_terms_after_warmup():
    def batch(it):
        return RolloutBatch(iteration=it, k=3, samples=[_sample(0, 2, True, 1.0), _sample(1, 6, False, 0.0),
                                                        _sample(2, 4, True, 1.0, finish="repeat")])
    warm = batch(1)
    shape_rewards(warm, _Cfg)  # iteration 1 < warmup 2: no length term
    assert [s.reward for s in warm.samples] == [1.0, 0.0, 0.0]  # repeat: 1 + (-1)
    on = batch(2)
    shape_rewards(on, _Cfg)
    # λ = 0.5 − (len − 2)/(6 − 2): [0.5, −0.5, 0]; correct: +λ, wrong: +min(0, λ)
    assert [s.reward for s in on.samples] == pytest.approx([1.5, -0.5, 0.0])
