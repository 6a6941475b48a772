"""Checkpoint directory names and lookup, importable without Megatron (the offline tools use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

LATEST = "latest"


class CheckpointError(ValueError):
    """A missing, incomplete or incompatible checkpoint (names the path)."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def resolve(path: str | Path) -> Optional[Path]:
    """A checkpoint dir itself, or a checkpoints/ dir with ``latest``; None if there is none."""
    path = Path(path)
    if (path / "metadata.json").is_file() or (path / "common.pt").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if not target.is_dir():
            raise CheckpointError(f"{latest}: points to {name!r}, which does not exist")
        return target
    return None
