"""Test devices and markers.

Every test chooses its device on purpose: CPU by default, CUDA only in ``gpu`` tests. On a machine
with a GPU this process initialises CUDA first (so in-process CUDA work stays possible), then sets
``CUDA_VISIBLE_DEVICES=""``: whatever a test starts (spawned ranks, module-scoped fixtures' ranks,
CLI subprocesses) runs on CPU/gloo through the CPU emulation, exactly as on a CPU-only machine. ``gpu``
tests get the original value back (``@pytest.mark.gpu(count=2)`` asks for two GPUs). ``vllm`` /
``slurm`` tests skip cleanly when the machine lacks what they need.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

# What CUDA_VISIBLE_DEVICES was when the run started. pytest-xdist workers inherit the controller's
# environment, in which it is already hidden: they take the original back before CUDA starts.
_SAVED = "KIMI_TESTS_CUDA_VISIBLE_DEVICES"
if _SAVED in os.environ:
    if os.environ[_SAVED] == "<unset>":
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[_SAVED]
else:
    os.environ[_SAVED] = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")

# Triton kernels run under its CPU interpreter when there is no GPU; the flag must be set before any
# @triton.jit function is defined (triton reads it at decoration time), so here, before test imports.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
if _GPUS:
    torch.cuda.init()  # before the variable changes: the CUDA runtime reads it once, at its start
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _reason(item) -> str | None:
    gpu = item.get_closest_marker("gpu")
    if gpu and _GPUS < gpu.kwargs.get("count", 1):
        return f"needs {gpu.kwargs.get('count', 1)} CUDA GPU(s), found {_GPUS}"
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


@pytest.fixture(autouse=True)
def _gpu_tests_see_the_gpu(request, monkeypatch):
    if _GPUS and request.node.get_closest_marker("gpu") is not None:
        if _VISIBLE is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _VISIBLE)
