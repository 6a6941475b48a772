"""RL resume: an RL run killed with -9 (once between saves, once inside a save) and preempted with
SIGUSR1, rerun each time, ends with the uninterrupted run's exact iterations, metrics and held-out
evaluations — none lost, none repeated."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from megatron_kimi.platform.preemption import CONFIRM_FILE, EXIT_PREEMPTED
from megatron_kimi.training.ckpt_paths import resolve
from tests.killing import after, launch, logged_step, saving, signal_when

ITERATIONS = 8
ARGS = ["rl", "examples/demo/rl.yaml", "data.reward=tests.rl.plugin_rewards:starts_with_digit",
        f"rl.iterations={ITERATIONS}", "rl.eval_interval=2", "data.eval_size=16", "rl.prompts_per_iteration=8",
        "rl.k=4", "rollout.max_new_tokens=3", "checkpoint.save_interval=2", "logging.tensorboard=false",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-3"]
SEED = int(os.environ.get("KIMI_CRASH_SEED", "20261204"))
KEYS = ("iteration", "reward", "accuracy", "loss", "grad_norm", "lr", "response_length_mean", "log_ratio",
        "eval_accuracy", "eval_response_length")


def _records(run: Path) -> list:
    p = run / "metrics.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return [{k: r.get(k) for k in KEYS} for r in recs]


def _iteration_of(ckpt) -> int:  # RL checkpoints are named by optimizer step: updates_per_iteration = 2
    return 0 if ckpt is None else int(Path(ckpt).name.split("_")[1]) // 2


@pytest.mark.slow
def test_rl_killed_and_preempted_resumes_exactly(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    with open(tmp_path / "straight.log", "w") as log:
        rc = launch([*ARGS, f"run_dir={straight}"], log).wait(timeout=600)
    assert rc == 0, (tmp_path / "straight.log").read_text()[-3000:]

    rng = random.Random(SEED)
    plan = [("kill", "iteration"), ("kill", "save"), ("usr1", "iteration")]
    for i, (how, when) in enumerate(plan):
        log_path = tmp_path / f"run{i}.log"
        latest = resolve(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        with open(log_path, "w") as log:
            t0 = time.time_ns()
            proc = launch([*ARGS, f"run_dir={run}"], log)
            if when == "save":
                cond = after(lambda: saving(run, t0), rng.uniform(0.0, 0.05))
            else:
                target = min(_iteration_of(latest) + rng.randint(1, 3), ITERATIONS - 2)
                cond = after(lambda: logged_step(log_path) >= target, rng.uniform(0.0, 0.3))
            sig = signal.SIGKILL if how == "kill" else signal.SIGUSR1
            signal_when(proc, cond, log_path, sig=sig)  # to the whole group, as srun does
            if how == "usr1":
                assert proc.wait(timeout=300) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
        text = log_path.read_text()
        if latest is not None and "resumed from" in text:
            assert f"resumed from {latest} at iteration {_iteration_of(latest)}" in text, text[-2000:]
        if how == "usr1":  # the stop checkpoint is confirmed and is the resume point
            confirm = json.loads((run / "checkpoints" / CONFIRM_FILE).read_text())
            assert Path(confirm["checkpoint"]) == resolve(run / "checkpoints").resolve()
            assert "preemption requested); checkpoint saved" in text

    with open(tmp_path / "final.log", "w") as log:
        rc = launch([*ARGS, f"run_dir={run}"], log).wait(timeout=600)
    text = (tmp_path / "final.log").read_text()
    assert rc == 0, text[-3000:]
    assert "resumed from" in text
    got, want = _records(run), _records(straight)
    assert [r["iteration"] for r in got] == list(range(1, ITERATIONS + 1))  # none lost, none repeated
    assert [r["eval_accuracy"] is not None for r in got] == [i % 2 == 0 for i in range(1, ITERATIONS + 1)]
    assert got == want  # every metric, the held-out evaluations included, bit for bit
    s_got = json.loads((run / "summary.json").read_text())
    s_want = json.loads((straight / "summary.json").read_text())
    assert s_got == s_want
