"""Where one training step's time goes: attention, GEMMs, norms, RoPE, loss, optimizer, comms, other, idle.

One step runs under ``torch.profiler``. Every device kernel (on CPU: every op's self time) is put in
one category, the first rule that applies:

1. its **name**: flash/varlen attention and our Triton attention kernels -> ``attention``; cuBLAS /
   CUTLASS GEMMs -> ``gemm``; the fused log-prob epilogues and cross-entropy kernels -> ``loss``;
   NCCL -> ``comms``; fused Adam / multi-tensor kernels -> ``optimizer``;
2. the **scope** it was launched from: the forward of norm modules, of the core attention module,
   Megatron's ``apply_rotary_pos_emb``, the model's loss (``_postprocess``) and the optimizer step are
   wrapped in ``kimi:<category>`` record_function scopes for the profiled step only;
3. for a backward op, the scope of the **forward op that created its autograd node** (the profiler
   gives both the same sequence number), so a norm's backward counts as ``norm``;
4. otherwise ``other`` (activations, residual adds, casts, copies).

``idle`` (GPU) is the step's wall time minus the time at least one kernel ran: launch overhead,
host syncs, Python. On CPU the categories are op self times and ``other`` includes everything
else the step spent (Python, the autograd engine).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

CATEGORIES = ("attention", "gemm", "norm", "rope", "loss", "optimizer", "comms", "other", "idle")

_KERNEL_RULES: List[Tuple[str, "re.Pattern[str]"]] = [
    ("attention", re.compile(r"flash|fmha|varlen|scaled_dot_product|_fwd_kernel|_bwd_dkdv|_bwd_dq|_bwd_preprocess",
                             re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$",
                        re.I)),
    ("loss", re.compile(r"_block_stats_kernel|_block_dz_kernel|cross_entropy|nll_loss|log_softmax", re.I)),
    ("comms", re.compile(r"nccl|^gloo|all_reduce|allreduce|reduce_scatter|all_gather|broadcast", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
]
_SCOPE = "kimi:"


def classify_name(name: str) -> Optional[str]:
    for category, pattern in _KERNEL_RULES:
        if pattern.search(name):
            return category
    return None


@contextlib.contextmanager
def _scoped(category: str) -> Iterator[None]:
    with torch.profiler.record_function(_SCOPE + category):
        yield


def _scope_forward(module: torch.nn.Module, category: str, undo: List[Callable[[], None]]) -> None:
    stack: List[contextlib.AbstractContextManager] = []

    def enter(_m, _args):
        cm = _scoped(category)
        cm.__enter__()
        stack.append(cm)

    def leave(_m, _args, _out):
        stack.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    undo.extend(h.remove for h in handles)


def _wrap_attr(owner, name: str, category: str, undo: List[Callable[[], None]]) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with _scoped(category):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    undo.append(lambda: setattr(owner, name, original))


@contextlib.contextmanager
def scopes(model_chunks, optimizer) -> Iterator[None]:
    """``kimi:*`` scopes around norms, core attention, RoPE, the loss and the optimizer step."""
    undo: List[Callable[[], None]] = []
    try:
        for chunk in model_chunks:
            for module in chunk.modules():
                kind = type(module).__name__
                if kind.endswith("Norm"):
                    _scope_forward(module, "norm", undo)
                elif "CoreAttention" in kind or "DotProductAttention" in kind:
                    _scope_forward(module, "attention", undo)
                elif hasattr(module, "_postprocess") and "_postprocess" not in vars(module):
                    _wrap_attr(module, "_postprocess", "loss", undo)  # the instance attr shadows the method
        try:
            from megatron.core.transformer import attention as mc_attention

            for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_with_cos_sin"):
                if hasattr(mc_attention, name):
                    _wrap_attr(mc_attention, name, "rope", undo)
        except ImportError:  # pragma: no cover - megatron is a dependency
            pass
        _wrap_attr(optimizer, "step", "optimizer", undo)
        yield
    finally:
        for fn in reversed(undo):
            fn()


def _own_scope(event, cache: Dict[int, Optional[str]]) -> Optional[str]:
    """The innermost ``kimi:`` scope enclosing a CPU event (or the event itself)."""
    chain = []
    e, found = event, None
    while e is not None:
        if id(e) in cache:
            found = cache[id(e)]
            break
        if e.name.startswith(_SCOPE):
            found = e.name[len(_SCOPE):]
            break
        chain.append(e)
        e = e.cpu_parent
    for c in chain:
        cache[id(c)] = found
    return found


def attribute(events, wall_s: float, on_device: bool) -> Dict[str, float]:
    """Seconds per category of one profiled step (``events``: ``profiler.events()``)."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]
    cache: Dict[int, Optional[str]] = {}
    forward_scope: Dict[int, str] = {}
    for e in cpu_events:
        if e.sequence_nr >= 0 and "Backward" not in e.name:
            scope = _own_scope(e, cache)
            if scope is not None:
                forward_scope.setdefault(e.sequence_nr, scope)

    def category(e, name: str) -> str:
        by_name = classify_name(name)
        if by_name is not None:
            return by_name
        scope = _own_scope(e, cache)
        if scope is not None:
            return scope
        p = e
        while p is not None:  # inside a backward node: the forward op's scope
            if "Backward" in p.name and p.sequence_nr in forward_scope:
                return forward_scope[p.sequence_nr]
            p = p.cpu_parent
        return "other"

    out = {c: 0.0 for c in CATEGORIES}
    if on_device:
        intervals = []
        for e in cpu_events:
            for k in e.kernels:
                out[category(e, k.name)] += k.duration / 1e6
        for e in events:
            if e.device_type != torch.autograd.DeviceType.CPU:
                intervals.append((e.time_range.start, e.time_range.end))
        busy, end = 0.0, float("-inf")
        for s, t in sorted(intervals):  # union of kernel intervals (streams overlap)
            if t > end:
                busy += t - max(s, end)
                end = t
        out["idle"] = max(0.0, wall_s - busy / 1e6)
    else:
        for e in cpu_events:
            if e.name.startswith(_SCOPE) or e.self_cpu_time_total <= 0:
                continue
            out[category(e, e.name)] += e.self_cpu_time_total / 1e6
        out["other"] += max(0.0, wall_s - sum(out.values()))
    return out


def profile_step(run_step: Callable[[], None], model_chunks, optimizer) -> Tuple[Dict[str, float], float]:
    """Run ``run_step`` once under the profiler; returns (seconds per category, wall seconds)."""
    on_device = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_device else [])
    with scopes(model_chunks, optimizer), torch.profiler.profile(activities=activities) as prof:
        if on_device:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_step()
        if on_device:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return attribute(prof.events(), wall, on_device), wall


def format_breakdown(seconds: Dict[str, float], wall_s: float, on_device: bool) -> str:
    unit = "device time" if on_device else "CPU op self time"
    lines = [f"time breakdown of one profiled step ({unit}; wall {wall_s * 1e3:.1f} ms under the profiler)"]
    for c in CATEGORIES:
        if c == "idle" and not on_device:
            continue
        t = seconds.get(c, 0.0)
        lines.append(f"  {c:<10} {t * 1e3:>10.1f} ms {100 * t / max(wall_s, 1e-12):>6.1f} %")
    return "\n".join(lines)
