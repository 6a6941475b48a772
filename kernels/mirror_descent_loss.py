"""Kimi k1.5 mirror-descent loss on packed per-token log-probs (and its fusion with the log-prob kernel).

For each packed sequence ``n`` (tokens ``cu_seqlens[n]:cu_seqlens[n+1]``) with advantage ``adv_n = r − r̄``:

    s_n    = Σ_t mask_t · (logp_t − old_logp_t)          (the sequence's log-ratio log π_θ/π_θi)
    loss_n = (adv_n − τ · s_n)²                           (see megatron_kimi.rl.loss.mirror_descent_loss)

The Triton kernel runs one program per segment that loops over its tokens (one pass: masked sum of the
log-ratio, then the squared surrogate); the backward kernel broadcasts the per-sequence coefficient
``dlogp_t = mask_t · (−2τ)(adv_n − τ·s_n) · g_n`` to the segment's tokens (tokens outside every
segment get 0). Gradients also flow to ``old_logp_T`` (−dlogp) and ``adv_N`` (2(adv − τs)·g) if asked.

:func:`fused_mirror_descent_loss` composes :func:`megatron_kimi.kernels.fused_logprob.token_logprob_entropy`
with this loss, so the ``[T, V]`` logits never exist. A deeper fusion (folding the loss into the
log-prob kernel) does not pay: the gradient of any token needs ``s_n``, the *whole* sequence's sum,
so the log-prob forward must finish every token of the sequence before any ``dz`` can be formed, and
the backward's per-token scale ``g_logp_t`` is just one fp32 per token that the log-prob backward
already consumes. All that a deeper fusion could save is this kernel's pass over ~5 [T] vectors
(bytes ≈ 20·T, vs the 2·T·V·H FLOPs of the log-prob kernels), at the price of a sequence-aware
log-prob kernel.

Dispatch as in ``fused_logprob``: ``backend="auto"`` -> Triton on CUDA (or on CPU under
TRITON_INTERPRET=1), else the PyTorch reference; ``"triton"`` / ``"ref"`` (``"torch"``: same as
``"ref"`` here) force one.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .fused_logprob import HAS_TRITON, resolve_backend, token_logprob_entropy

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["mirror_descent_loss_packed", "mirror_descent_loss_packed_ref", "fused_mirror_descent_loss"]

CuSeqlens = Union[torch.Tensor, Sequence[int]]

if HAS_TRITON:

    @triton.jit
    def _md_fwd_kernel(logp_ptr, old_ptr, mask_ptr, cu_ptr, adv_ptr, s_ptr, loss_ptr, tau, BLOCK: tl.constexpr):
        """Program per segment: s = Σ mask·(logp − old) over its tokens, loss = (adv − τ·s)²."""
        n = tl.program_id(0)
        start = tl.load(cu_ptr + n)
        end = tl.load(cu_ptr + n + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            lp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            mk = tl.load(mask_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc += mk * (lp - old)
        s = tl.sum(acc, axis=0)
        r = tl.load(adv_ptr + n).to(tl.float32) - tau * s
        tl.store(s_ptr + n, s)
        tl.store(loss_ptr + n, r * r)

    @triton.jit
    def _md_bwd_kernel(mask_ptr, cu_ptr, adv_ptr, s_ptr, g_ptr, dlogp_ptr, tau, BLOCK: tl.constexpr):
        """Program per segment: dlogp_t = mask_t · (−2τ)(adv − τ·s) · g for its tokens."""
        n = tl.program_id(0)
        start = tl.load(cu_ptr + n)
        end = tl.load(cu_ptr + n + 1)
        r = tl.load(adv_ptr + n).to(tl.float32) - tau * tl.load(s_ptr + n)
        coef = -2.0 * tau * r * tl.load(g_ptr + n)
        for t0 in range(start, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            ok = offs < end
            mk = tl.load(mask_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(dlogp_ptr + offs, mk * coef, mask=ok)


_BLOCK = 1024


class _MirrorDescentPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp_T, old_logp_T, mask_T, cu_N1, adv_N, tau):
        N = cu_N1.numel() - 1
        s_N = torch.empty(N, dtype=torch.float32, device=logp_T.device)
        loss_N = torch.empty(N, dtype=torch.float32, device=logp_T.device)
        if N:
            _md_fwd_kernel[(N,)](logp_T, old_logp_T, mask_T, cu_N1, adv_N, s_N, loss_N, tau, BLOCK=_BLOCK,
                                 num_warps=4)
        ctx.save_for_backward(mask_T, cu_N1, adv_N, s_N)
        ctx.tau, ctx.T = tau, logp_T.shape[0]
        ctx.dtypes = (logp_T.dtype, old_logp_T.dtype, adv_N.dtype)
        return loss_N

    @staticmethod
    def backward(ctx, g_N):
        mask_T, cu_N1, adv_N, s_N = ctx.saved_tensors
        need_lp, need_old, need_adv = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        g_N = g_N.float().contiguous()
        d_logp = d_old = d_adv = None
        if need_lp or need_old:
            dlogp_T = torch.zeros(ctx.T, dtype=torch.float32, device=g_N.device)
            if g_N.numel():
                _md_bwd_kernel[(g_N.numel(),)](mask_T, cu_N1, adv_N, s_N, g_N, dlogp_T, ctx.tau, BLOCK=_BLOCK,
                                               num_warps=4)
            d_logp = dlogp_T.to(ctx.dtypes[0]) if need_lp else None
            d_old = (-dlogp_T).to(ctx.dtypes[1]) if need_old else None
        if need_adv:
            d_adv = (2.0 * (adv_N.float() - ctx.tau * s_N) * g_N).to(ctx.dtypes[2])
        return d_logp, d_old, None, None, d_adv, None


def _prepare(logp_T, old_logp_T, mask_T, cu_seqlens, adv_N, tau):
    """Validate; cu_seqlens -> int64 tensor on logp's device."""
    if logp_T.dim() != 1 or old_logp_T.shape != logp_T.shape or mask_T.shape != logp_T.shape:
        raise ValueError(f"logp_T, old_logp_T and mask_T must be equal [T] vectors, got {tuple(logp_T.shape)}, "
                         f"{tuple(old_logp_T.shape)}, {tuple(mask_T.shape)}")
    on_host = not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device.type == "cpu"
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D [N+1] sequence, got shape {tuple(cu.shape)}")
    if adv_N.shape != (cu.numel() - 1,):
        raise ValueError(f"adv_N must be [N]={cu.numel() - 1} (one per segment), got {tuple(adv_N.shape)}")
    if on_host:  # offsets already on the GPU are not checked (that would cost a device sync)
        if int(cu[0]) < 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > logp_T.shape[0]:
            raise ValueError(f"cu_seqlens must be non-decreasing within [0, T={logp_T.shape[0]}], got {cu.tolist()}")
    cu = cu.to(logp_T.device)
    if not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a Python number, got {type(tau).__name__}")
    if mask_T.dtype == torch.bool:
        mask_T = mask_T.float()
    return cu, mask_T


def mirror_descent_loss_packed(logp_T: torch.Tensor, old_logp_T: torch.Tensor, mask_T: torch.Tensor,
                               cu_seqlens: CuSeqlens, adv_N: torch.Tensor, tau: float,
                               backend: str = "auto") -> torch.Tensor:
    """Per-sequence ``(adv − τ·Σ_seq mask·(logp − old_logp))²`` as fp32 ``[N]`` (packed THD tokens)."""
    cu, mask_T = _prepare(logp_T, old_logp_T, mask_T, cu_seqlens, adv_N, tau)
    impl = resolve_backend(backend, logp_T.device)
    if impl in ("ref", "torch"):
        return mirror_descent_loss_packed_ref(logp_T, old_logp_T, mask_T, cu, adv_N, tau)
    return _MirrorDescentPacked.apply(logp_T.contiguous(), old_logp_T.contiguous(), mask_T.contiguous(), cu,
                                      adv_N.contiguous(), float(tau))


def mirror_descent_loss_packed_ref(logp_T: torch.Tensor, old_logp_T: torch.Tensor, mask_T: torch.Tensor,
                                   cu_seqlens: CuSeqlens, adv_N: torch.Tensor, tau: float) -> torch.Tensor:
    """Pure torch: segment sums of ``mask·(logp − old_logp)`` (index_add), then the square."""
    cu, mask_T = _prepare(logp_T, old_logp_T, mask_T, cu_seqlens, adv_N, tau)
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    ratio = mask_T.float() * (logp_T.float() - old_logp_T.float())
    first, last = int(cu[0]), int(cu[-1])  # consecutive segments cover tokens [cu[0], cu[-1])
    s_N = torch.zeros(lengths.numel(), dtype=torch.float32, device=cu.device).index_add(0, seg, ratio[first:last])
    return (adv_N.float() - tau * s_N).pow(2)


def fused_mirror_descent_loss(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                              old_logp_T: torch.Tensor, mask_T: torch.Tensor, cu_seqlens: CuSeqlens,
                              adv_N: torch.Tensor, tau: float, tp_group=None, vocab_start: int = 0,
                              temperature: float = 1.0, token_block: int = 8192,
                              vocab_chunk: Optional[int] = None,
                              backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss_N, logp_T, entropy_T)`` from the final hidden states, never forming [T, V] logits.

    ``token_logprob_entropy`` (vocab-parallel over ``tp_group``) then :func:`mirror_descent_loss_packed`;
    backward goes through both custom functions (the loss hands the log-prob backward one scale per
    token). ``entropy_T`` is differentiable too (use it for a bonus, or ``.detach()`` it for metrics).
    """
    logp_T, entropy_T = token_logprob_entropy(hidden_TH, weight_VH, labels_T, tp_group=tp_group,
                                              vocab_start=vocab_start, temperature=temperature,
                                              token_block=token_block, vocab_chunk=vocab_chunk,
                                              backend=backend)
    loss_N = mirror_descent_loss_packed(logp_T, old_logp_T.to(logp_T.device), mask_T, cu_seqlens, adv_N, tau,
                                        backend=backend)
    return loss_N, logp_T, entropy_T
