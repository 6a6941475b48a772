"""Packed (THD) attention, causal or not: one dispatch for every caller.

Callers: the model's THD core attention (megatron_kimi/model/attention.py), context parallelism's
prefix attention (megatron_kimi/parallel/context.py) and the rollout engine's prefill
(megatron_kimi/rollout/model_runner.py). Implementations, in the order ``auto`` tries them:

* Transformer Engine comes first at the layer level: where it is installed, the TE layer spec
  (``model.transformer_impl``) runs TE's own THD (and CP) attention and never calls this helper;
* ``torch``: PyTorch's own varlen flash attention ``torch.nn.attention.varlen.varlen_attn`` (torch
  >= 2.10 on CUDA; fp16/bf16 only: flash kernels have no fp32 path). Causal is ``window_size=(-1, 0)``.
  Without ``enable_gqa`` (torch < 2.13) K/V heads are repeated to the query heads;
* ``triton``: our kernel (megatron_kimi/kernels/varlen_attention.py), CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``; fp16/bf16/fp32;
* ``ref``: PyTorch SDPA (a block-diagonal mask, or one call per sample for long packs), any device.

``auto`` picks the first that applies to the inputs; on CPU that is always ``ref`` (``triton`` on CPU
tensors, under the interpreter, only when forced: tests do that). A caller (``model.attention_impl``) can
force one; an impl that cannot take the inputs raises ``ValueError`` saying why, rather than
silently falling back.

``cu_k`` differing from ``cu_q`` (context parallelism: each query chunk against its sample's whole
key prefix) means causal masks aligned to the bottom-right (query i of a length-Lq chunk sees keys
``< Lk - Lq + i + 1``), which is what the Triton kernel and the reference implement. ``auto`` uses
``torch`` only when ``cu_k`` is ``cu_q``; forcing ``torch`` on prefixes relies on the flash
kernels' own bottom-right convention (covered by a GPU test).

Dropout (``dropout_p > 0``) has only the reference implementation.

``causal=False`` (the vision tower: each image a segment that sees itself whole) is taken by all
three implementations: ``window_size=(-1, -1)`` for torch's, the kernel's own ``causal`` flag.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

IMPLS = ("auto", "torch", "triton", "ref")


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """(varlen_attn, takes_enable_gqa) or None where this torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _triton_usable(q: torch.Tensor) -> bool:
    from megatron_kimi.kernels import varlen_attention as va

    return va.triton is not None and (q.is_cuda or va._interpreted())


def resolve_impl(impl: str, q: torch.Tensor, same_kv_layout: bool, dropout_p: float = 0.0) -> str:
    """The implementation ``impl`` means for these inputs (``auto`` resolved; forced ones checked)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {'|'.join(IMPLS)}, got {impl!r}")
    if dropout_p > 0.0:
        if impl not in ("auto", "ref"):
            raise ValueError(f"attention impl {impl!r} has no dropout; use model.attention_dropout=0 or impl 'ref'")
        return "ref"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if impl == "auto":
        if q.is_cuda and same_kv_layout and half and _torch_varlen() is not None:
            return "torch"
        # CPU: the SDPA reference (the interpreter is for testing the kernel, never a default).
        return "triton" if q.is_cuda and _triton_usable(q) else "ref"
    if impl == "torch" and not (q.is_cuda and half and _torch_varlen() is not None):
        raise ValueError("attention impl 'torch' needs torch.nn.attention.varlen (torch >= 2.10), CUDA tensors "
                         "and fp16/bf16")
    if impl == "triton" and not _triton_usable(q):
        raise ValueError("attention impl 'triton' needs triton and CUDA tensors (CPU tensors only under "
                         "TRITON_INTERPRET=1)")
    return impl


def packed_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: Optional[torch.Tensor] = None, *, scale: float, max_q: Optional[int] = None,
                     max_k: Optional[int] = None, impl: str = "auto", dropout_p: float = 0.0,
                     causal: bool = True) -> torch.Tensor:
    """Attention of each packed sample to itself: q [T, Hq, D], k/v [Tk, Hkv, D] -> [T, Hq, D].

    ``cu_q``/``cu_k``: int32 cumulative lengths (``cu_k`` None: the same as ``cu_q``). ``max_q``/
    ``max_k``: the longest sample (the flash implementations need it; computing it here costs a host
    sync, so callers that know it pass it).
    """
    same = cu_k is None or cu_k is cu_q
    cu_k = cu_q if cu_k is None else cu_k
    which = resolve_impl(impl, q_THD, same, dropout_p)
    if which == "ref":
        if same:
            from megatron_kimi.model.attention import varlen_attention_thd_ref

            return varlen_attention_thd_ref(q_THD, k_THD, v_THD, cu_q, scale, dropout_p, causal=causal)
        from megatron_kimi.kernels.varlen_attention import varlen_attention

        return varlen_attention(q_THD, k_THD, v_THD, cu_q, cu_k, softmax_scale=scale, causal=causal,
                                backend="ref")[0]
    if which == "triton":
        from megatron_kimi.kernels.varlen_attention import varlen_attention

        return varlen_attention(q_THD, k_THD, v_THD, cu_q, cu_k, softmax_scale=scale, causal=causal,
                                backend="triton")[0]
    cu_q32 = cu_q.to(device=q_THD.device, dtype=torch.int32)
    cu_k32 = cu_q32 if same else cu_k.to(device=q_THD.device, dtype=torch.int32)
    if max_q is None:
        max_q = int((cu_q32[1:] - cu_q32[:-1]).max())
    if max_k is None:
        max_k = max_q if same else int((cu_k32[1:] - cu_k32[:-1]).max())
    varlen_attn, gqa = _torch_varlen()
    rep = q_THD.shape[1] // k_THD.shape[1]
    kw = {}
    if rep > 1 and gqa:
        kw["enable_gqa"] = True
    elif rep > 1:
        k_THD, v_THD = k_THD.repeat_interleave(rep, 1), v_THD.repeat_interleave(rep, 1)
    return varlen_attn(q_THD, k_THD, v_THD, cu_q32, cu_k32, max_q, max_k, scale=scale,
                       window_size=(-1, 0) if causal else (-1, -1), **kw)
