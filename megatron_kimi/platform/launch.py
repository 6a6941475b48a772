"""Launch-environment detection and ``torch.distributed`` process-group setup.

:func:`detect_env` reads the environment (``os.environ`` by default) and decides how we were started:

* ``"torchrun"``: ``RANK`` and ``WORLD_SIZE`` are both set (setting only one is an error).
  ``LOCAL_RANK`` defaults to ``RANK``, ``LOCAL_WORLD_SIZE`` to ``WORLD_SIZE`` (single-node assumption),
  ``MASTER_ADDR`` to ``127.0.0.1``, ``MASTER_PORT`` to 29500.
* ``"srun"``: ``SLURM_PROCID`` is set *and* we are inside a job step (``SLURM_STEP_ID``/``SLURM_STEPID``
  present; a batch script sees ``SLURM_PROCID`` too but is no step, so it is ``"single"``).
  rank = ``SLURM_PROCID``, world = ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), local rank =
  ``SLURM_LOCALID``, local world size = this node's (``SLURM_NODEID``, default 0) entry of
  ``SLURM_STEP_TASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``), a list like ``"2(x3),1"``.
  ``MASTER_ADDR``: the environment's, else the first host of ``SLURM_STEP_NODELIST`` (else
  ``SLURM_JOB_NODELIST``), e.g. ``"node[01-04,07]"`` -> ``node01``. ``MASTER_PORT``: the
  environment's, else ``20000 + SLURM_JOB_ID % 20000`` (the same on every rank of the job).
* ``"single"``: otherwise; rank 0 of 1 on ``127.0.0.1`` with a free TCP port (bound to port 0).

Malformed values (non-integers, negatives, rank >= world size, bad host lists) raise ``ValueError``
naming the variable and its value. :func:`init_process_group` then creates the default process group:
``nccl`` on CUDA (after ``torch.cuda.set_device(local_rank)``), else ``gloo`` with
:mod:`megatron_kimi.platform.cpu_emulation` activated.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Mapping

__all__ = ["DistEnv", "detect_env", "expand_hostlist", "first_host", "init_process_group"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single", "torchrun" or "srun"


def _int(e: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = e.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is required but not set")
        return default
    if re.fullmatch(r"\s*-?[0-9]+\s*", raw) is None:  # int() alone would accept "1_000" and "+1"
        raise ValueError(f"environment variable {name}={raw!r} is not an integer")
    value = int(raw)
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _first_set(e: Mapping[str, str], *names: str) -> str | None:
    return next((n for n in names if e.get(n) is not None), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may still take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _expand_ranges(body: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]`` (zero padding of the lower bound kept)."""
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list: ``"a[1,3],b[2-4]"`` -> ``["a1", "a3", "b2", "b3", "b4"]``."""
    exprs, depth, cur = [], 0, ""
    try:
        for ch in hostlist.strip():  # split on commas outside brackets
            if ch == "," and depth == 0:
                exprs, cur = exprs + [cur], ""
                continue
            depth += (ch == "[") - (ch == "]")
            if depth not in (0, 1):
                raise ValueError("unbalanced brackets")
            cur += ch
        if depth:
            raise ValueError("unbalanced brackets")
        hosts: list[str] = []
        for expr in exprs + [cur]:
            if not expr.strip():
                raise ValueError("empty host name")
            expanded = [""]
            # re.split alternates literal text and bracket bodies: "a[1-2]b" -> ["a", "1-2", "b"]
            for i, piece in enumerate(re.split(r"\[([^\[\]]*)\]", expr.strip())):
                options = _expand_ranges(piece) if i % 2 else [piece]
                expanded = [x + o for x in expanded for o in options]
            hosts.extend(expanded)
        return hosts
    except ValueError as exc:
        raise ValueError(f"malformed Slurm host list {hostlist!r}: {exc}") from None


def first_host(hostlist: str) -> str:
    """The first host of a Slurm host list (``"node[01-04,07]"`` -> ``"node01"``)."""
    return expand_hostlist(hostlist)[0]


def _tasks_per_node(e: Mapping[str, str], name: str, node_id: int) -> int:
    """Entry ``node_id`` of a compressed tasks-per-node list such as ``"2(x3),1"``."""
    if name not in e:
        raise ValueError(f"environment variable {name} is required but not set")
    counts: list[int] = []
    for item in e[name].split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"environment variable {name}={e[name]!r} is not a Slurm tasks-per-node list")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if node_id >= len(counts):
        raise ValueError(f"environment variable {name}={e[name]!r} has no entry for SLURM_NODEID={node_id}")
    return counts[node_id]


def _checked(env: DistEnv, rank_var: str, local_var: str) -> DistEnv:
    if env.rank >= env.world_size:
        raise ValueError(f"environment variable {rank_var}={env.rank} must be < world size {env.world_size}")
    if env.local_rank >= env.local_world_size:
        raise ValueError(f"environment variable {local_var}={env.local_rank} must be < {env.local_world_size}")
    if env.master_port > 65535:
        raise ValueError(f"environment variable MASTER_PORT={env.master_port} is not a TCP port")
    return env


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Decide rank / world size / master address from the launch environment (see module docstring)."""
    e: Mapping[str, str] = os.environ if environ is None else environ
    if (e.get("RANK") is None) != (e.get("WORLD_SIZE") is None):
        raise ValueError(f"environment variables RANK={e.get('RANK')!r} and WORLD_SIZE={e.get('WORLD_SIZE')!r}: "
                         "set both (torchrun-style launch) or neither")
    if e.get("RANK") is not None:
        rank, world = _int(e, "RANK"), _int(e, "WORLD_SIZE", minimum=1)
        local_rank = _int(e, "LOCAL_RANK", default=rank)
        local_world = _int(e, "LOCAL_WORLD_SIZE", default=world, minimum=1)
        port = _int(e, "MASTER_PORT", default=29500, minimum=1)
        env = DistEnv(rank, world, local_rank, local_world, e.get("MASTER_ADDR") or "127.0.0.1", port, "torchrun")
        return _checked(env, "RANK", "LOCAL_RANK")

    if e.get("SLURM_PROCID") is not None and _first_set(e, "SLURM_STEP_ID", "SLURM_STEPID"):
        addr = e.get("MASTER_ADDR")
        if not addr:
            nodes_var = _first_set(e, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
            if nodes_var is None:
                raise ValueError("neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set")
            try:
                addr = first_host(e[nodes_var])
            except ValueError as exc:
                raise ValueError(f"environment variable {nodes_var}: {exc}") from None
        if e.get("MASTER_PORT") is not None or e.get("SLURM_JOB_ID") is None:
            port = _int(e, "MASTER_PORT", default=29500, minimum=1)
        else:
            port = 20000 + _int(e, "SLURM_JOB_ID") % 20000
        rank, local_rank = _int(e, "SLURM_PROCID"), _int(e, "SLURM_LOCALID")
        world = _int(e, _first_set(e, "SLURM_STEP_NUM_TASKS") or "SLURM_NTASKS", minimum=1)
        tpn_var = _first_set(e, "SLURM_STEP_TASKS_PER_NODE") or "SLURM_TASKS_PER_NODE"
        local_world = _tasks_per_node(e, tpn_var, _int(e, "SLURM_NODEID", default=0))
        env = DistEnv(rank, world, local_rank, local_world, addr, port, "srun")
        return _checked(env, "SLURM_PROCID", "SLURM_LOCALID")

    return DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def init_process_group(env: DistEnv, timeout_s: float = 600.0) -> str:
    """Create the default process group for ``env`` (no-op if one exists). Returns the backend name."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(env.local_rank)
    else:
        from megatron_kimi.platform import cpu_emulation

        backend = "gloo"
        cpu_emulation.activate()
    if dist.is_initialized():
        return str(dist.get_backend())
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # IPv6 literal
    dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    return backend


@contextlib.contextmanager
def environ(values: Dict[str, str]):
    """``os.environ`` with ``values`` set (a child process started inside inherits them), restored on
    exit: every key back to its value before, or removed when it had none."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
