"""Launch checks the batch script runs once, before it starts any rank (``megatron-kimi preflight``).

A bad launch should fail in seconds with one clear line, not after N nodes have imported Megatron:
the config must load (errors name the file and field), the world size must fit the parallel layout
and the batch sizes, and under Slurm the job must have one task per GPU with those GPUs visible.
Prints the run directory (the scripts put their logs under it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_kimi.config import ConfigError, load_config, validate_layout


@dataclass(frozen=True)
class LaunchShape:
    world_size: int
    tasks_per_node: int
    gpus_per_node: Optional[int]  # what the job asked for (None: not a GPU job / unknown)
    visible_gpus: int  # what this node sees


def parse_gpus(raw: Optional[str]) -> Optional[int]:
    """Slurm's ``SLURM_GPUS_ON_NODE``/``SLURM_GPUS_PER_NODE`` ("8", "h100:8") -> 8; None when unset/empty."""
    if raw is None or not raw.strip():
        return None
    tail = raw.strip().split(":")[-1].split("(")[0]
    if not tail.isdigit():
        raise ConfigError(f"cannot read a GPU count from SLURM_GPUS_PER_NODE={raw!r}")
    return int(tail)


def check_launch(schema: type, config: str, overrides: Sequence[str], shape: LaunchShape) -> str:
    """Raises ConfigError with the reason; returns the run directory."""
    cfg = load_config(config, list(overrides), schema)
    if shape.gpus_per_node:
        if shape.tasks_per_node != shape.gpus_per_node:
            raise ConfigError(
                f"one task per GPU: the job has {shape.tasks_per_node} tasks per node but "
                f"{shape.gpus_per_node} GPUs per node (set --ntasks-per-node={shape.gpus_per_node})"
            )
        if shape.visible_gpus < shape.gpus_per_node:
            raise ConfigError(
                f"the job asked for {shape.gpus_per_node} GPUs per node but this node sees "
                f"{shape.visible_gpus} (check CUDA_VISIBLE_DEVICES / --gpus-per-node)"
            )
    validate_layout(cfg, shape.world_size)
    return str(cfg.run_dir)
