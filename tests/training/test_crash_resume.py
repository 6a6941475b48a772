"""kill -9 at random moments (seeded plan), including in the middle of checkpoint saves: every rerun
resumes from the checkpoint ``latest`` names, which is always complete, and the finished run has the
uninterrupted run's exact loss curve with every step in ``metrics.jsonl`` exactly once."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from megatron_kimi.ckpt_tools.inspect import verify
from megatron_kimi.training.ckpt_paths import resolve
from tests.killing import after, launch, logged_step, saving, signal_when

STEPS = 20
ARGS = ["train", "examples/tiny/train.yaml", f"training.steps={STEPS}", "optimizer.warmup_steps=2",
        f"optimizer.decay_steps={STEPS}", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
        "logging.progress_bar=false", "logging.tensorboard=false", "data.builtin_num_lines=3000"]
SEED = int(os.environ.get("KIMI_CRASH_SEED", "20261204"))
KILLS = 5


def _metrics(run: Path) -> list:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


@pytest.mark.slow
def test_kill9_at_random_moments_resumes_exactly(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "crashed"
    with open(tmp_path / "straight.log", "w") as log:
        rc = launch([*ARGS, f"run_dir={straight}"], log).wait(timeout=600)
    assert rc == 0, (tmp_path / "straight.log").read_text()[-3000:]

    rng = random.Random(SEED)
    # at least two kills inside a save; the rest a random number of steps in, or early in start-up
    plan = ["save", "save", "step", "step", rng.choice(["step", "save", "startup"])]
    rng.shuffle(plan)
    kills = []
    for i, kind in enumerate(plan):
        log_path = tmp_path / f"run{i}.log"
        latest = resolve(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        with open(log_path, "w") as log:
            proc = launch([*ARGS, f"run_dir={run}"], log)
            target = min(latest_step(latest) + rng.randint(1, 4), STEPS - 2)
            if kind == "save":  # some steps in, then inside the next save (its .tmp directory exists)
                mark: list = []

                def in_save(target=target, mark=mark):
                    if not mark and logged_step(log_path) >= target:
                        mark.append(time.time_ns())
                    return bool(mark) and saving(run, mark[0])

                cond = after(in_save, rng.uniform(0.0, 0.05))
            elif kind == "step":
                cond = after(lambda: logged_step(log_path) >= target, rng.uniform(0.0, 0.3))
            else:
                cond = after(lambda: True, rng.uniform(1.0, 6.0))
            signal_when(proc, cond, log_path)
        kills.append((kind, latest_step(latest), logged_step(log_path)))
        text = log_path.read_text()
        if latest is not None and "resumed from" in text:  # it got as far as loading: from `latest`
            assert f"resumed from {latest} at step {latest_step(latest)}\n" in text, text[-2000:]
        now = resolve(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        if now is not None:
            _, common, _ = verify(now)  # raises if the checkpoint `latest` names is incomplete
            assert common["train_state"]["step"] == latest_step(now)

    with open(tmp_path / "final.log", "w") as log:
        rc = launch([*ARGS, f"run_dir={run}"], log).wait(timeout=600)
    assert rc == 0, (tmp_path / "final.log").read_text()[-3000:]
    got, want = _metrics(run), _metrics(straight)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), (kills, [r["step"] for r in got])
    assert [r["loss"] for r in got] == [r["loss"] for r in want], kills  # bit-identical curve
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert len(kills) >= KILLS
    print("kills (kind, resumed from step, last step logged):", kills)


def latest_step(ckpt) -> int:
    return 0 if ckpt is None else int(Path(ckpt).name.split("_")[1])
