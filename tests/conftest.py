"""Markers: gpu / vllm / slurm tests skip cleanly when the machine lacks what they need."""

from __future__ import annotations

import importlib.util
import os
import shutil

# Triton kernels run under its CPU interpreter when there is no GPU; the flag must be set before any
# @triton.jit function is defined (triton reads it at decoration time), so here, before test imports.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _reason(item) -> str | None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if item.get_closest_marker("vllm") and importlib.util.find_spec("vllm") is None:
        return "needs vllm"
    if item.get_closest_marker("slurm") and shutil.which("slurmctld") is None and (
        os.geteuid() != 0 or shutil.which("apt-get") is None
    ):  # as root with apt, tests/slurm/cluster.sh installs Debian's Slurm
        return "needs Slurm (slurmctld), or root + apt-get to install it"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
