"""`megatron-kimi preflight`: the launch checks the batch scripts run before starting any rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist import run_cli

from megatron_kimi.config import ConfigError, SFTConfig, TrainConfig
from megatron_kimi.platform.preflight import LaunchShape, check_launch, parse_gpus

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "examples/tiny/train.yaml")


def test_a_good_launch_returns_the_run_dir():
    assert check_launch(TrainConfig, TRAIN, ["run_dir=/x/y"], LaunchShape(2, 2, None, 0)) == "/x/y"


def test_world_size_must_fit_the_layout():
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tensor=2"):
        check_launch(TrainConfig, TRAIN, ["parallel.tensor=2"], LaunchShape(3, 3, None, 0))


def test_one_task_per_gpu_and_the_gpus_must_be_visible():
    with pytest.raises(ConfigError, match="4 tasks per node but 8 GPUs per node"):
        check_launch(TrainConfig, TRAIN, [], LaunchShape(8, 4, 8, 8))
    with pytest.raises(ConfigError, match="asked for 8 GPUs per node but this node sees 2"):
        check_launch(TrainConfig, TRAIN, [], LaunchShape(8, 8, 8, 2))
    assert check_launch(TrainConfig, TRAIN, ["run_dir=r", "training.micro_batch_size=1"], LaunchShape(16, 8, 8, 8)) == "r"


def test_slurm_gpu_counts_parse():
    assert parse_gpus("8") == 8 and parse_gpus("h100:8") == 8 and parse_gpus("") is None and parse_gpus(None) is None
    with pytest.raises(ConfigError, match="SLURM_GPUS_PER_NODE='h100:x'"):
        parse_gpus("h100:x")


def test_bad_config_field_is_named():
    with pytest.raises(ConfigError, match="stagess"):
        check_launch(SFTConfig, str(REPO / "examples/tiny/sft.yaml"), ["stagess=1"], LaunchShape(1, 1, None, 0))


def test_cli_prints_run_dir_or_a_launch_error():
    ok = run_cli(["preflight", "train", TRAIN, "run_dir=/r", "--world", "2"], cwd=str(REPO), timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "/r", ok.stderr
    bad = run_cli(["preflight", "train", TRAIN, "parallel.tensor=2", "--world", "3"], cwd=str(REPO), timeout=60)
    assert bad.returncode == 2 and "launch error: world size 3" in bad.stderr and bad.stdout == ""
