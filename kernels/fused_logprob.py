"""Fused vocab-parallel token log-prob + entropy: ``log softmax(h·Wᵀ/τ)[label]`` and ``H(softmax)``.

The RL loss only needs, per token, the log-prob of the sampled token and (for metrics or an entropy
bonus) the entropy of the policy. The naive path materialises fp32 logits ``[T, V]`` (V ≈ 150k: 0.6 MB
per token, 2.5 GB for 4096 tokens) plus its softmax and their gradients. Here they never exist:

* **forward** (Triton): one kernel tiles the [T, V_local] logits, computes each ``[BLOCK_T, BLOCK_V]``
  tile with ``tl.dot`` over H in fp32 and folds it immediately into per-token online statistics
  relative to a running max ``m``: ``s = Σ exp(z−m)``, ``b = Σ exp(z−m)·(z−m)`` and the target logit.
  Nothing of size V is stored. The V axis is split over ``num_splits`` programs per token block (so a
  few token blocks still fill the GPU); their partial statistics are combined exactly like the TP
  ranks' (below). The PyTorch path (``backend="torch"``) computes the same statistics chunk by chunk
  (``chunk_size`` tokens at a time, so only a ``[chunk, V_local]`` fp32 block exists).
* **tensor parallel**: each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the output
  layer. The per-rank statistics are combined with one all-reduce MAX of ``m`` and one all-reduce SUM
  of the stacked ``[s·e^{m−M}, e^{m−M}·(b + (m−M)·s), target]`` (only the rank owning a label has a
  non-zero target logit). We carry ``Σ e^{z−m}(z−m)`` rather than the brief's ``Σ e^{z}·z``: it is the
  same quantity shifted by ``m·s`` and avoids the cancellation in ``entropy = log S − B/S`` (no
  ``logZ − E[z]`` difference of two large numbers).
* **backward** (custom ``autograd.Function``): per chunk of ``chunk_size`` tokens the logits are
  recomputed (Triton: fused in the kernel that writes ``dz``; torch: a matmul) and turned into
  ``dz_v = g_logp·(onehot_v − p_v) − g_ent·p_v·(z_v − E_p[z])`` (÷τ for the logits), stored as a
  ``[chunk, V_local]`` block in the input dtype; then ``grad_hidden = dz @ W_local`` and
  ``grad_weight += dzᵀ @ hidden`` with cuBLAS/BLAS. ``g_logp`` / ``g_ent`` may be ``None``.
  **grad_hidden is all-reduced (SUM) over ``tp_group``**: the hidden is replicated across the TP ranks
  and each rank's ``dz @ W_local`` is only its vocab shard's share. Pass the plain replicated
  final-norm output, not a tensor that went through Megatron's ``copy_to_tensor_model_parallel_region``
  / sequence-parallel gather (their backward would reduce a second time).

Labels are global token ids; a label that no rank owns (e.g. an ignore index −100) gets target logit
0, so its logp is meaningless (mask it) and its gradient has no one-hot term.

Memory: forward O(T) (Triton) or O(chunk·V) (torch); backward O(chunk·V) plus the gradients.

Dispatch (``backend="auto"``): Triton for CUDA tensors; on CPU the PyTorch chunked path, except when
``TRITON_INTERPRET=1`` was set before this module was imported (then the Triton kernels run under
the interpreter). ``"triton"`` / ``"torch"`` force one; ``"ref"`` is the naive full-logits reference
:func:`token_logprob_entropy_ref` (all-gathers the vocab shards).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

try:  # Triton is optional: without it the PyTorch paths still work.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["token_logprob_entropy", "token_logprob_entropy_ref", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch", "ref")

# triton decides interpreter-or-compiler when a function is decorated (module import), so record it.
_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA (or on CPU under TRITON_INTERPRET=1), else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if HAS_TRITON else "torch"
        return "triton" if _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package")
        if device.type != "cuda" and not _INTERPRETED:
            raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 set before megatron_kimi.kernels "
                             "modules are imported")
    return backend


# ----------------------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, H, stride_ht, stride_hh, stride_wv, stride_wh,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
        """fp32 ``h[offs_t] @ w[offs_v]ᵀ`` as a [BLOCK_T, BLOCK_V] tile (masked rows/cols read zeros)."""
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            h_tile = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh,
                             mask=t_ok[:, None] & h_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                             mask=v_ok[None, :] & h_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_V] = Wᵀ
            if IEEE:
                acc = tl.dot(h_tile, w_tile, acc, input_precision="ieee")
            else:
                acc = tl.dot(h_tile, w_tile, acc)
        return acc

    @triton.jit
    def _logprob_stats_kernel(h_ptr, w_ptr, labels_ptr, stats_ptr, T, V, H, stride_ht, stride_hh, stride_wv,
                              stride_wh, vocab_start, inv_temp, v_per_split, num_splits,
                              BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                              IEEE: tl.constexpr):
        """Program (token block, vocab split): online max / Σe^{z−m} / Σe^{z−m}(z−m) / target logit.

        Writes ``stats[k, split, t]`` for k = (m, s, b, target), fp32 ``[4, num_splits, T]``.
        """
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = offs_t < T
        label = tl.load(labels_ptr + offs_t, mask=t_ok, other=-1) - vocab_start  # local id (may be outside)
        m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        b = tl.zeros([BLOCK_T], dtype=tl.float32)
        tgt = tl.zeros([BLOCK_T], dtype=tl.float32)
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_ok = offs_v < v_hi
            z = _logits_tile(h_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, H, stride_ht, stride_hh, stride_wv,
                             stride_wh, BLOCK_T, BLOCK_V, BLOCK_H, IEEE) * inv_temp
            z = tl.where(v_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
            d = tl.where(v_ok[None, :], z - m_new[:, None], 0.0)  # no 0·(−inf) on the masked tail
            e = tl.where(v_ok[None, :], tl.exp(d), 0.0)
            alpha = tl.exp(m - m_new)  # 0 on the first tile (m = −inf)
            shift = tl.where(s > 0, m - m_new, 0.0)
            # rescale to the new max: e^{z−m'}(z−m') = e^{m−m'}·e^{z−m}·((z−m) + (m−m'))
            b = alpha * (b + shift * s) + tl.sum(e * d, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new
            hit = (offs_v[None, :] == label[:, None]) & v_ok[None, :]
            tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        base = pid_s * T + offs_t
        plane = num_splits * T
        tl.store(stats_ptr + base, m, mask=t_ok)
        tl.store(stats_ptr + plane + base, s, mask=t_ok)
        tl.store(stats_ptr + 2 * plane + base, b, mask=t_ok)
        tl.store(stats_ptr + 3 * plane + base, tgt, mask=t_ok)

    @triton.jit
    def _logprob_dz_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, ez_ptr, glogp_ptr, gent_ptr, dz_ptr, T, V, H,
                           stride_ht, stride_hh, stride_wv, stride_wh, stride_dz, vocab_start, inv_temp,
                           HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
        """Program (token block, vocab block): recompute the logit tile, write d(loss)/d(logits)."""
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        t_ok = offs_t < T
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, offs_t, t_ok, offs_v, v_ok, H, stride_ht, stride_hh, stride_wv,
                         stride_wh, BLOCK_T, BLOCK_V, BLOCK_H, IEEE) * inv_temp
        lse = tl.load(lse_ptr + offs_t, mask=t_ok, other=0.0)
        p = tl.exp(z - lse[:, None])
        dz = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        if HAS_GLOGP:
            g = tl.load(glogp_ptr + offs_t, mask=t_ok, other=0.0)
            label = tl.load(labels_ptr + offs_t, mask=t_ok, other=-1) - vocab_start
            onehot = tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0)
            dz += g[:, None] * (onehot - p)
        if HAS_GENT:
            g_e = tl.load(gent_ptr + offs_t, mask=t_ok, other=0.0)
            ez = tl.load(ez_ptr + offs_t, mask=t_ok, other=0.0)
            dz -= g_e[:, None] * p * (z - ez[:, None])
        dz = dz * inv_temp
        tl.store(dz_ptr + offs_t[:, None] * stride_dz + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & v_ok[None, :])


_BLOCK_T, _BLOCK_V, _BLOCK_H = 64, 128, 64


def _blocks(T: int, H: int) -> Tuple[int, int, int]:
    """Tile sizes (tl.dot needs every dim >= 16); smaller token tiles for tiny T."""
    block_t = min(_BLOCK_T, max(16, triton.next_power_of_2(T)))
    block_h = min(_BLOCK_H, max(16, triton.next_power_of_2(H)))
    return block_t, _BLOCK_V, block_h


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs: exact fp32 dot products unless torch itself allows TF32 matmuls."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _num_splits(t_blocks: int, v_blocks: int, device: torch.device) -> int:
    """How many programs share one token block's vocab range, so that ~2 programs run per SM."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(v_blocks, -(-target // t_blocks)))


def _stats_triton(hidden_TH, weight_VH, labels_T, vocab_start: int, inv_temp: float, chunk_size: int,
                  num_splits: Optional[int] = None) -> torch.Tensor:
    """Partial statistics ``[4, P, T]`` (m, s, b, target) over P vocab splits of this rank's shard."""
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    block_t, block_v, block_h = _blocks(T, H)
    t_blocks, v_blocks = triton.cdiv(T, block_t), triton.cdiv(V, block_v)
    P = num_splits or _num_splits(t_blocks, v_blocks, hidden_TH.device)
    v_per_split = triton.cdiv(triton.cdiv(V, P), block_v) * block_v
    P = triton.cdiv(V, v_per_split)  # every split non-empty
    stats = torch.empty(4, P, T, dtype=torch.float32, device=hidden_TH.device)
    _logprob_stats_kernel[(t_blocks, P)](
        hidden_TH, weight_VH, labels_T, stats, T, V, H, hidden_TH.stride(0), hidden_TH.stride(1),
        weight_VH.stride(0), weight_VH.stride(1), vocab_start, inv_temp, v_per_split, P,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, IEEE=_ieee(hidden_TH.dtype), num_warps=8)
    return stats


def _dz_triton(hidden_CH, weight_VH, labels_C, lse_C, ez_C, g_logp_C, g_ent_C, vocab_start: int,
               inv_temp: float) -> torch.Tensor:
    C, H = hidden_CH.shape
    V = weight_VH.shape[0]
    block_t, block_v, block_h = _blocks(C, H)
    dz_CV = torch.empty(C, V, dtype=hidden_CH.dtype, device=hidden_CH.device)
    dummy = lse_C
    _logprob_dz_kernel[(triton.cdiv(C, block_t), triton.cdiv(V, block_v))](
        hidden_CH, weight_VH, labels_C, lse_C, ez_C, dummy if g_logp_C is None else g_logp_C,
        dummy if g_ent_C is None else g_ent_C, dz_CV, C, V, H, hidden_CH.stride(0), hidden_CH.stride(1),
        weight_VH.stride(0), weight_VH.stride(1), dz_CV.stride(0), vocab_start, inv_temp,
        HAS_GLOGP=g_logp_C is not None, HAS_GENT=g_ent_C is not None, BLOCK_T=block_t, BLOCK_V=block_v,
        BLOCK_H=block_h, IEEE=_ieee(hidden_CH.dtype), num_warps=8)
    return dz_CV


# ---------------------------------------------------------------------------------- PyTorch path

def _local_label(labels_C: torch.Tensor, vocab_start: int, V: int) -> Tuple[torch.Tensor, torch.Tensor]:
    local = labels_C - vocab_start
    owned = (local >= 0) & (local < V)
    return local.clamp(0, V - 1), owned


def _chunk_logits(hidden_CH, weight_VH, inv_temp: float) -> torch.Tensor:
    z_CV = (hidden_CH @ weight_VH.t()).float()  # a fresh buffer either way: scaling in place is safe
    return z_CV.mul_(inv_temp) if inv_temp != 1.0 else z_CV


def _stats_torch(hidden_TH, weight_VH, labels_T, vocab_start: int, inv_temp: float, chunk_size: int) -> torch.Tensor:
    """The same ``[4, 1, T]`` statistics, ``chunk_size`` tokens at a time (two [chunk, V] fp32 buffers)."""
    T = hidden_TH.shape[0]
    V = weight_VH.shape[0]
    stats = torch.empty(4, 1, T, dtype=torch.float32, device=hidden_TH.device)
    for c0 in range(0, T, chunk_size):
        c1 = min(T, c0 + chunk_size)
        z_CV = _chunk_logits(hidden_TH[c0:c1], weight_VH, inv_temp)
        local, owned = _local_label(labels_T[c0:c1], vocab_start, V)
        stats[3, 0, c0:c1] = torch.where(owned, z_CV.gather(1, local[:, None])[:, 0], 0.0)
        m_C = z_CV.amax(dim=1)
        d_CV = z_CV.sub_(m_C[:, None])
        e_CV = torch.exp(d_CV)
        stats[0, 0, c0:c1] = m_C
        stats[1, 0, c0:c1] = e_CV.sum(dim=1)
        stats[2, 0, c0:c1] = e_CV.mul_(d_CV).sum(dim=1)
        del z_CV, d_CV, e_CV
    return stats


def _dz_torch(hidden_CH, weight_VH, labels_C, lse_C, ez_C, g_logp_C, g_ent_C, vocab_start: int,
              inv_temp: float) -> torch.Tensor:
    z_CV = _chunk_logits(hidden_CH, weight_VH, inv_temp)
    p_CV = (z_CV - lse_C[:, None]).exp_()  # two [C, V] fp32 buffers at most: z and p
    if g_ent_C is not None:  # −g_ent·p·(z − E_p z)
        dz_CV = z_CV.sub_(ez_C[:, None]).mul_(p_CV).mul_(-g_ent_C[:, None])
    else:
        dz_CV = z_CV.zero_()
    if g_logp_C is not None:  # + g_logp·(onehot − p)
        dz_CV.addcmul_(p_CV, g_logp_C[:, None], value=-1.0)
        local, owned = _local_label(labels_C, vocab_start, weight_VH.shape[0])
        dz_CV.scatter_add_(1, local[:, None], torch.where(owned, g_logp_C, 0.0)[:, None])
    del p_CV
    if inv_temp != 1.0:
        dz_CV.mul_(inv_temp)
    return dz_CV.to(hidden_CH.dtype)


# ------------------------------------------------------------------------------- combine + autograd

def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def _combine(stats: torch.Tensor, tp_group) -> Tuple[torch.Tensor, ...]:
    """Partials ``[4, P, T]`` of this rank -> global (logp, entropy, logZ, E_p[z]) per token."""
    m, s, b, tgt = stats.unbind(0)
    M = m.amax(dim=0)
    if _tp_size(tp_group) > 1:
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=tp_group)
    alpha = torch.exp(m - M)  # [P, T]; m finite -> alpha in (0, 1]
    sums = torch.stack([(s * alpha).sum(0), (alpha * (b + (m - M) * s)).sum(0), tgt.sum(0)])
    if _tp_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    S, B, target = sums.unbind(0)
    lse = M + torch.log(S)
    mean_shift = B / S  # E_p[z] − M
    return target - lse, torch.log(S) - mean_shift, lse, M + mean_shift


class _TokenLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, tp_group, vocab_start, temperature, chunk_size, use_triton):
        inv_temp = 1.0 / temperature
        stats_fn = _stats_triton if use_triton else _stats_torch
        logp_T, ent_T, lse_T, ez_T = _combine(stats_fn(hidden_TH, weight_VH, labels_T, vocab_start, inv_temp,
                                                       chunk_size), tp_group)
        ctx.save_for_backward(hidden_TH, weight_VH, labels_T, lse_T, ez_T)
        ctx.tp_group, ctx.vocab_start, ctx.inv_temp = tp_group, vocab_start, inv_temp
        ctx.chunk_size, ctx.use_triton = chunk_size, use_triton
        ctx.set_materialize_grads(False)
        return logp_T, ent_T

    @staticmethod
    def backward(ctx, g_logp_T, g_ent_T):
        hidden_TH, weight_VH, labels_T, lse_T, ez_T = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp_T is None and g_ent_T is None) or not (need_h or need_w):
            return (None,) * 8
        g_logp_T = None if g_logp_T is None else g_logp_T.float().contiguous()
        g_ent_T = None if g_ent_T is None else g_ent_T.float().contiguous()
        T = hidden_TH.shape[0]
        chunk = ctx.chunk_size
        n_chunks = -(-T // chunk)
        grad_h = torch.empty_like(hidden_TH) if need_h else None
        grad_w = None
        if need_w:  # several low-precision chunks accumulate in fp32
            acc_dtype = torch.float32 if n_chunks > 1 else weight_VH.dtype
            grad_w = torch.zeros(weight_VH.shape, dtype=acc_dtype, device=weight_VH.device)
        dz_fn = _dz_triton if ctx.use_triton else _dz_torch
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            h_CH = hidden_TH[c0:c1]
            dz_CV = dz_fn(h_CH, weight_VH, labels_T[c0:c1], lse_T[c0:c1], ez_T[c0:c1],
                          None if g_logp_T is None else g_logp_T[c0:c1],
                          None if g_ent_T is None else g_ent_T[c0:c1], ctx.vocab_start, ctx.inv_temp)
            if need_h:
                torch.mm(dz_CV, weight_VH, out=grad_h[c0:c1])
            if need_w:
                if grad_w.dtype == dz_CV.dtype:
                    grad_w.addmm_(dz_CV.t(), h_CH)
                else:
                    grad_w.add_(dz_CV.t() @ h_CH)
            del dz_CV
        if need_h and _tp_size(ctx.tp_group) > 1:
            dist.all_reduce(grad_h, group=ctx.tp_group)  # hidden is replicated: sum the vocab shards' shares
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _check(hidden_TH, weight_VH, labels_T, temperature, chunk_size=1) -> None:
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2:
        raise ValueError(f"hidden_TH must be [T, H] and weight_VH [V, H], got {tuple(hidden_TH.shape)} and "
                         f"{tuple(weight_VH.shape)}")
    if hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {hidden_TH.shape[1]} vs weight {weight_VH.shape[1]}")
    if weight_VH.shape[0] == 0:
        raise ValueError("weight_VH has no vocab rows")
    if hidden_TH.dtype != weight_VH.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden_TH.dtype} vs {weight_VH.dtype}")
    if labels_T.shape != (hidden_TH.shape[0],):
        raise ValueError(f"labels_T must be [T]={hidden_TH.shape[0]}, got {tuple(labels_T.shape)}")
    if labels_T.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels_T must be int64/int32 token ids, got {labels_T.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def token_logprob_entropy(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, tp_group=None,
                          vocab_start: int = 0, temperature: float = 1.0, chunk_size: int = 4096,
                          backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logp_T, entropy_T)`` (fp32) over the global vocabulary, without [T, V] logits.

    ``weight_VH`` is this TP rank's rows ``[vocab_start, vocab_start + V_local)`` of the output layer
    (``tp_group=None``: the whole vocabulary); ``labels_T`` are global ids. Differentiable wrt
    ``hidden_TH`` (gradient all-reduced over ``tp_group``) and ``weight_VH`` (local shard).
    ``chunk_size`` tokens are processed at a time in the backward (and the torch forward).
    """
    _check(hidden_TH, weight_VH, labels_T, temperature, chunk_size)
    impl = resolve_backend(backend, hidden_TH.device)
    if impl == "ref":
        return token_logprob_entropy_ref(hidden_TH, weight_VH, labels_T, tp_group, vocab_start, temperature)
    labels_T = labels_T.long().contiguous()
    return _TokenLogprobEntropy.apply(hidden_TH, weight_VH, labels_T, tp_group, int(vocab_start),
                                      float(temperature), int(chunk_size),
                                      impl == "triton" and hidden_TH.shape[0] > 0)  # no empty Triton grid


def token_logprob_entropy_ref(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                              tp_group=None, vocab_start: int = 0, temperature: float = 1.0):
    """Naive reference: full fp32 logits ``[T, V]``, ``log_softmax``, gather, ``−Σ p log p``.

    With ``tp_group`` the other ranks' vocab shards are all-gathered (as constants) around this rank's
    own ``weight_VH``, so the gradients match the fused op's: the full one for the (replicated) hidden,
    this shard's slice for the weight. Shards must be equal-sized and in rank order.
    """
    _check(hidden_TH, weight_VH, labels_T, temperature)
    weight_full = weight_VH
    offset = vocab_start
    if _tp_size(tp_group) > 1:
        shards = [torch.empty_like(weight_VH) for _ in range(_tp_size(tp_group))]
        dist.all_gather(shards, weight_VH.detach().contiguous(), group=tp_group)
        rank = dist.get_rank(tp_group)
        shards[rank] = weight_VH
        offset = vocab_start - rank * weight_VH.shape[0]
        weight_full = torch.cat(shards, dim=0)
    logits_TV = (hidden_TH.float() @ weight_full.float().t()) / temperature
    logp_TV = torch.log_softmax(logits_TV, dim=-1)
    idx = (labels_T.long() - offset).clamp(0, weight_full.shape[0] - 1)
    owned = (labels_T.long() - offset >= 0) & (labels_T.long() - offset < weight_full.shape[0])
    logp_T = torch.where(owned, logp_TV.gather(1, idx[:, None])[:, 0], -torch.logsumexp(logits_TV, -1))
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return logp_T, entropy_T
