"""`megatron-kimi difficulty`: per-prompt pass rates of a checkpoint, written next to the original fields."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_cli

from megatron_kimi.commands.difficulty import read_records, summary_line
from megatron_kimi.config import RLConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 4
# The demo's RL model; a reward that a near-random init passes now and then (pass rates in [0, 1]).
COMMON = ["data.reward=tests.rl.plugin_rewards:starts_with_digit", "rollout.max_new_tokens=3",
          "logging.tensorboard=false", "logging.progress_bar=false"]


def _cli(*args, nproc=1, check=True):
    out = run_cli(list(args), cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, nproc=nproc)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint (one RL iteration from the demo config) and a prompts file with extra fields."""
    tmp = tmp_path_factory.mktemp("difficulty")
    _cli("rl", "examples/demo/rl.yaml", f"run_dir={tmp / 'rl'}", "rl.iterations=1", "rl.k=2",
         "rl.prompts_per_iteration=2", "data.eval_size=2", *COMMON)
    rows = [{"id": f"q{i}", "prompt": f"{i}+{2 * i}=", "answer": str(3 * i), "kind": "exact",
             "source": {"n": i}, **({"difficulty": "easy"} if i == 0 else {})} for i in range(7)]
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line
    return tmp, tmp / "rl" / "checkpoints", prompts, rows


def _measure(setup, run_dir, *extra, nproc=1):
    tmp, ckpt, prompts, _ = setup
    return _cli("difficulty", "examples/demo/rl.yaml", f"run_dir={run_dir}", f"checkpoint.load={ckpt}",
                f"data.prompts={prompts}", f"difficulty.samples={SAMPLES}", "difficulty.batch_prompts=3",
                *COMMON, *extra, nproc=nproc)


def test_writes_every_prompt_with_its_fields_and_difficulty(setup):
    tmp, _, prompts, rows = setup
    before = prompts.read_bytes()
    out = _measure(setup, tmp / "m1")
    path = tmp / "m1" / "prompts_difficulty.jsonl"
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(got) == len(rows)
    for src, g in zip(rows, got):
        assert {k: v for k, v in g.items() if k not in ("difficulty", "pass_rate")} == \
            {k: v for k, v in src.items() if k != "difficulty"}  # every original field, in order
        assert 0.0 <= g["pass_rate"] <= 1.0 and 0.0 <= g["difficulty"] <= 1.0
        assert g["difficulty"] == 1.0 - g["pass_rate"]
        assert (g["pass_rate"] * SAMPLES).is_integer()
    assert prompts.read_bytes() == before  # the input is never rewritten
    assert not list((tmp / "m1").glob("*.tmp"))
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"difficulty: {len(rows)} prompts x {SAMPLES} samples, mean pass rate") and str(path) in last

    # Two data-parallel ranks split the prompts; per-request seeds give the same samples, so the same file.
    _measure(setup, tmp / "m2", "difficulty.output=" + str(tmp / "m2" / "d.jsonl"), nproc=2)
    assert (tmp / "m2" / "d.jsonl").read_text() == path.read_text()


def test_errors_for_no_checkpoint_and_output_equal_to_input(setup):
    tmp, _, prompts, _ = setup
    out = _cli("difficulty", "examples/demo/rl.yaml", f"run_dir={tmp / 'fresh'}", f"data.prompts={prompts}",
               *COMMON, check=False)
    assert out.returncode == 2 and "no checkpoint to measure" in out.stderr and "checkpoint.load" in out.stderr
    assert not (tmp / "fresh" / "prompts_difficulty.jsonl").exists()
    before = prompts.read_bytes()
    out = _cli("difficulty", "examples/demo/rl.yaml", f"run_dir={tmp / 'same'}", f"checkpoint.load={setup[1]}",
               f"data.prompts={prompts}", f"difficulty.output={prompts}", *COMMON, check=False)
    assert out.returncode == 2 and "is data.prompts" in out.stderr, out.stderr[-2000:]
    assert prompts.read_bytes() == before


def test_builtin_arithmetic_records_are_the_training_prompts():
    cfg = load_config(str(REPO / "examples/demo/rl.yaml"), [], RLConfig)
    records, prompts = read_records(cfg)
    assert len(records) == len(prompts) == 4000
    assert records[0] == {"prompt": prompts[0].prompt, "answer": prompts[0].answer, "kind": "exact"}


def test_summary_counts_difficulty_buckets(tmp_path):
    line = summary_line([1.0, 0.0, 0.5, 0.0], tmp_path / "o.jsonl", 2)
    assert "4 prompts x 2 samples, mean pass rate 0.375" in line
    assert "difficulty 0 (always solved): 1, in (0,1): 1, 1 (never solved): 2" in line
