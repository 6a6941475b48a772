"""Fused vocab-parallel token log-prob + entropy: ``log softmax(h·Wᵀ/τ)[label]`` and ``H(softmax)``.

The RL loss only needs, per token, the log-prob of the sampled token and (for metrics or an entropy
bonus) the entropy of the policy. The naive path materialises fp32 logits ``[T, V]`` (V ≈ 150k: 0.6 MB
per token, 5 GB for 8192 tokens) plus its softmax and their gradients. Here only one
``[token_block, vocab_chunk]`` block of logits exists at a time.

Design (the one Liger-Kernel's fused linear cross-entropy uses, tiled over the vocab instead of the
tokens): the GEMMs go to cuBLAS, the softmax statistics and the logit gradient are one memory-bound
pass each over the block. (An earlier version computed the logit tiles inside a Triton kernel with
``tl.dot``; on an H200 that forward reached 30 % of cuBLAS's bf16 rate and its recompute made the
whole op 1.3× slower than the naive one. cuBLAS + a one-pass epilogue is both faster and simpler.)

* **forward**: for each vocab chunk ``[v0, v1)`` of this rank's shard and each token block, the fp32
  logits block ``z = h·W[v0:v1]ᵀ`` (bf16 inputs, fp32 accumulate *and* fp32 output where torch
  supports ``mm(..., out_dtype=float32)``, i.e. on CUDA) is reduced per token to the chunk's statistics
  relative to the chunk max ``m``: ``s = Σ e^{z−m}``, ``b = Σ e^{z−m}(z−m)`` and the target logit (zero
  unless the chunk owns the label). Partials of all chunks, and then of all TP ranks, are combined
  exactly (:func:`_combine`). Nothing of size V per token survives the chunk.
* **tensor parallel**: each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the output
  layer. The per-rank statistics are combined with one all-reduce MAX of ``m`` and one all-reduce SUM
  of the stacked ``[s·e^{m−M}, e^{m−M}·(b + (m−M)·s), target]``. We carry ``Σ e^{z−m}(z−m)`` rather
  than ``Σ e^{z}·z``: the same quantity shifted by ``m·s``, without the cancellation in
  ``entropy = log S − B/S``.
* **backward** (custom ``autograd.Function``): per block the logits are recomputed (one more GEMM, the
  price of never storing them) and turned into
  ``dz_v = g_logp·(onehot_v − p_v) − g_ent·p_v·(z_v − E_p[z])`` (÷τ), stored in the input dtype (as
  the naive path's logit gradient is); then ``grad_hidden += dz @ W[v0:v1]`` (accumulated over the
  vocab chunks in fp32, ``[T, H]``) and ``grad_weight[v0:v1] = dzᵀ @ hidden`` (one GEMM per chunk
  when T fits one token block, so the weight gradient is rounded once, like the naive path's; over
  several token blocks a ``[vocab_chunk, H]`` fp32 accumulator). The loop runs vocab-outer so that
  the only full-size accumulator is the small ``[T, H]`` one, never a ``[V, H]`` fp32 copy.
  **grad_hidden is all-reduced (SUM) over ``tp_group``**: the hidden is replicated across the TP ranks
  and each rank's ``dz @ W_local`` is only its vocab shard's share. Pass the plain replicated
  final-norm output, not a tensor that went through Megatron's ``copy_to_tensor_model_parallel_region``
  / sequence-parallel gather (their backward would reduce a second time).

Labels are global token ids; a label that no rank owns (e.g. an ignore index −100) gets target logit
0, so its logp is meaningless (mask it) and its gradient has no one-hot term.

Memory beyond the inputs and the gradients themselves: one fp32 logits block + one ``dz`` block
(``_BLOCK_BYTES`` of fp32 logits by default), plus a ``[T, H]`` fp32 accumulator in the backward.

Backends (``backend=``): the GEMMs are always ``torch.mm``; the epilogue (statistics, ``dz``) is a
Triton kernel (``"triton"``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` set before
this module was imported) or PyTorch ops (``"torch"``). ``"auto"`` picks Triton on CUDA and PyTorch on
CPU (unless interpreted). ``"ref"`` is the naive full-logits reference
:func:`token_logprob_entropy_ref` (all-gathers the vocab shards).
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Optional, Tuple

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

# Default size of one fp32 logits block. 128 MiB keeps the op's own memory (logits + dz blocks + the
# [T, H] accumulator) near 1/10 of the naive path's at T 8192, V 152k, while each block's GEMM
# ([8192, 4096] x [4096, 4096] at H 4096) is still large enough for cuBLAS to run at its full rate.
_BLOCK_BYTES = 128 * 2 ** 20
_DEFAULT_TOKEN_BLOCK = 8192


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


# ----------------------------------------------------------------------------------------- GEMMs

@functools.lru_cache(maxsize=None)
def _has_mm_out_dtype(device_type: str) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs here (cuBLAS on recent torch; not CPU)."""
    if device_type != "cuda":
        return False
    a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device_type)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b``: low-precision inputs accumulate in fp32 and, where supported, stay fp32 on output."""
    if a.dtype == torch.float32:
        return a @ b
    if _has_mm_out_dtype(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()  # what the naive path (Megatron's output layer, then .float()) computes


def _blocks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    return ((i, min(n, i + size)) for i in range(0, n, size))


def _vocab_chunk(token_block: int, V: int, vocab_chunk: Optional[int]) -> int:
    if vocab_chunk:
        return min(V, vocab_chunk)
    rows = _BLOCK_BYTES // (4 * max(1, token_block))
    return min(V, max(256, rows // 256 * 256))  # multiples of 256 rows keep cuBLAS on its fast tiles


# ------------------------------------------------------------------------------ Triton epilogues

if HAS_TRITON:

    @triton.jit
    def _block_stats_kernel(z_ptr, labels_ptr, stats_ptr, K, stride_z, plane, label_off, inv_temp,
                            BLOCK_V: tl.constexpr):
        """Row t of a raw fp32 logits block [C, K]: max m, Σe^{z−m}, Σe^{z−m}(z−m), target (all ×1/τ).

        Two passes over the row (the second mostly from L2): max + target, then the sums relative to
        the final max, so no online rescaling and no −inf arithmetic on masked lanes.
        """
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        label = tl.load(labels_ptr + row) - label_off
        m_vec = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        tgt_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_V):
            cols = k0 + tl.arange(0, BLOCK_V)
            ok = cols < K
            z = tl.load(z_row + cols, mask=ok, other=float("-inf")) * inv_temp
            m_vec = tl.maximum(m_vec, z)
            tgt_vec += tl.where((cols == label) & ok, z, 0.0)
        m = tl.max(m_vec, axis=0)  # finite: K >= 1 valid column
        s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        b_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_V):
            cols = k0 + tl.arange(0, BLOCK_V)
            ok = cols < K
            d = tl.load(z_row + cols, mask=ok, other=0.0) * inv_temp - m
            e = tl.where(ok, tl.exp(d), 0.0)
            s_vec += e
            b_vec += e * d
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + plane + row, tl.sum(s_vec, axis=0))
        tl.store(stats_ptr + 2 * plane + row, tl.sum(b_vec, axis=0))
        tl.store(stats_ptr + 3 * plane + row, tl.sum(tgt_vec, axis=0))

    @triton.jit
    def _block_dz_kernel(z_ptr, dz_ptr, labels_ptr, lse_ptr, ez_ptr, glogp_ptr, gent_ptr, K, stride_z, stride_dz,
                         label_off, inv_temp, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
                         BLOCK_V: tl.constexpr):
        """d(loss)/d(raw logits) for row t, columns of block pid 1, written in dz's dtype."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = cols < K
        z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=0.0) * inv_temp
        p = tl.exp(z - tl.load(lse_ptr + row))
        dz = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GLOGP:
            g = tl.load(glogp_ptr + row)
            label = tl.load(labels_ptr + row) - label_off
            dz += g * (tl.where(cols == label, 1.0, 0.0) - p)
        if HAS_GENT:
            dz -= tl.load(gent_ptr + row) * p * (z - tl.load(ez_ptr + row))
        tl.store(dz_ptr + row * stride_dz + cols, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=ok)


_EPILOGUE_BLOCK_V = 1024


def _stats_block_triton(z_CK, labels_C, label_off: int, inv_temp: float, out_4C: torch.Tensor) -> None:
    C, K = z_CK.shape
    _block_stats_kernel[(C,)](z_CK, labels_C, out_4C, K, z_CK.stride(0), out_4C.stride(0), label_off, inv_temp,
                              BLOCK_V=_EPILOGUE_BLOCK_V, num_warps=4)


def _dz_block_triton(z_CK, labels_C, label_off: int, lse_C, ez_C, g_logp_C, g_ent_C, inv_temp: float,
                     dtype: torch.dtype) -> torch.Tensor:
    C, K = z_CK.shape
    dz_CK = torch.empty(C, K, dtype=dtype, device=z_CK.device)
    _block_dz_kernel[(C, triton.cdiv(K, _EPILOGUE_BLOCK_V))](
        z_CK, dz_CK, labels_C, lse_C, ez_C, lse_C if g_logp_C is None else g_logp_C,
        lse_C if g_ent_C is None else g_ent_C, K, z_CK.stride(0), dz_CK.stride(0), label_off, inv_temp,
        HAS_GLOGP=g_logp_C is not None, HAS_GENT=g_ent_C is not None, BLOCK_V=_EPILOGUE_BLOCK_V, num_warps=4)
    return dz_CK


# ------------------------------------------------------------------------------ PyTorch epilogues

def _local_label(labels_C: torch.Tensor, label_off: int, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    local = labels_C - label_off
    owned = (local >= 0) & (local < K)
    return local.clamp(0, K - 1), owned


def _stats_block_torch(z_CK, labels_C, label_off: int, inv_temp: float, out_4C: torch.Tensor) -> None:
    """The same statistics with PyTorch ops; ``z_CK`` (a fresh block) is overwritten."""
    if inv_temp != 1.0:
        z_CK.mul_(inv_temp)
    local, owned = _local_label(labels_C, label_off, z_CK.shape[1])
    out_4C[3] = torch.where(owned, z_CK.gather(1, local[:, None])[:, 0], 0.0)
    m_C = z_CK.amax(dim=1)
    d_CK = z_CK.sub_(m_C[:, None])
    e_CK = torch.exp(d_CK)
    out_4C[0] = m_C
    out_4C[1] = e_CK.sum(dim=1)
    out_4C[2] = e_CK.mul_(d_CK).sum(dim=1)


def _dz_block_torch(z_CK, labels_C, label_off: int, lse_C, ez_C, g_logp_C, g_ent_C, inv_temp: float,
                    dtype: torch.dtype) -> torch.Tensor:
    if inv_temp != 1.0:
        z_CK.mul_(inv_temp)
    p_CK = (z_CK - lse_C[:, None]).exp_()  # two [C, K] fp32 buffers at most: z and p
    if g_ent_C is not None:  # −g_ent·p·(z − E_p z)
        dz_CK = z_CK.sub_(ez_C[:, None]).mul_(p_CK).mul_(-g_ent_C[:, None])
    else:
        dz_CK = z_CK.zero_()
    if g_logp_C is not None:  # + g_logp·(onehot − p)
        dz_CK.addcmul_(p_CK, g_logp_C[:, None], value=-1.0)
        local, owned = _local_label(labels_C, label_off, z_CK.shape[1])
        dz_CK.scatter_add_(1, local[:, None], torch.where(owned, g_logp_C, 0.0)[:, None])
    del p_CK
    if inv_temp != 1.0:
        dz_CK.mul_(inv_temp)
    return dz_CK.to(dtype)


# ------------------------------------------------------------------------------- combine + autograd

def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def _stats(hidden_TH, weight_VH, labels_T, vocab_start: int, inv_temp: float, token_block: int,
           vocab_chunk: int, use_triton: bool) -> torch.Tensor:
    """Partial statistics ``[4, P, T]`` (m, s, b, target), one plane row per vocab chunk of this shard."""
    T, V = hidden_TH.shape[0], weight_VH.shape[0]
    chunks = list(_blocks(V, vocab_chunk))
    stats = torch.empty(4, len(chunks), T, dtype=torch.float32, device=hidden_TH.device)
    stats_fn = _stats_block_triton if use_triton else _stats_block_torch
    for p, (v0, v1) in enumerate(chunks):
        w_KH = weight_VH[v0:v1]
        for t0, t1 in _blocks(T, token_block):
            z_CK = _mm_f32(hidden_TH[t0:t1], w_KH.t())
            stats_fn(z_CK, labels_T[t0:t1], vocab_start + v0, inv_temp, stats[:, p, t0:t1])
            del z_CK
    return stats


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
    def forward(ctx, hidden_TH, weight_VH, labels_T, tp_group, vocab_start, temperature, token_block, vocab_chunk,
                use_triton):
        inv_temp = 1.0 / temperature
        stats = _stats(hidden_TH, weight_VH, labels_T, vocab_start, inv_temp, token_block, vocab_chunk, use_triton)
        logp_T, ent_T, lse_T, ez_T = _combine(stats, tp_group)
        ctx.save_for_backward(hidden_TH, weight_VH, labels_T, lse_T, ez_T)
        ctx.tp_group, ctx.vocab_start, ctx.inv_temp = tp_group, vocab_start, inv_temp
        ctx.token_block, ctx.vocab_chunk, ctx.use_triton = token_block, vocab_chunk, use_triton
        ctx.set_materialize_grads(False)
        return logp_T, ent_T

    @staticmethod
    def backward(ctx, g_logp_T, g_ent_T):
        hidden_TH, weight_VH, labels_T, lse_T, ez_T = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 9
        if (g_logp_T is None and g_ent_T is None) or not (need_h or need_w):
            return none
        g_logp_T = None if g_logp_T is None else g_logp_T.float().contiguous()
        g_ent_T = None if g_ent_T is None else g_ent_T.float().contiguous()
        T, V = hidden_TH.shape[0], weight_VH.shape[0]
        token_blocks = list(_blocks(T, ctx.token_block))
        dz_fn = _dz_block_triton if ctx.use_triton else _dz_block_torch
        gh_acc = torch.zeros(hidden_TH.shape, dtype=torch.float32, device=hidden_TH.device) if need_h else None
        # contiguous, so that each chunk's rows are a valid ``out=`` for torch.mm
        grad_w = torch.empty(weight_VH.shape, dtype=weight_VH.dtype, device=weight_VH.device) if need_w else None
        for v0, v1 in _blocks(V, ctx.vocab_chunk):
            w_KH = weight_VH[v0:v1]
            gw_acc = None  # fp32 [K, H], only when several token blocks feed this chunk
            for t0, t1 in token_blocks:
                h_CH = hidden_TH[t0:t1]
                z_CK = _mm_f32(h_CH, w_KH.t())
                dz_CK = dz_fn(z_CK, labels_T[t0:t1], ctx.vocab_start + v0, lse_T[t0:t1], ez_T[t0:t1],
                              None if g_logp_T is None else g_logp_T[t0:t1],
                              None if g_ent_T is None else g_ent_T[t0:t1], ctx.inv_temp, hidden_TH.dtype)
                del z_CK
                if need_h:
                    gh_acc[t0:t1] += _mm_f32(dz_CK, w_KH)
                if need_w:
                    if len(token_blocks) == 1:  # one GEMM, rounded once into the weight's dtype
                        torch.mm(dz_CK.t(), h_CH, out=grad_w[v0:v1])
                    elif gw_acc is None:
                        gw_acc = _mm_f32(dz_CK.t(), h_CH)
                    else:
                        gw_acc += _mm_f32(dz_CK.t(), h_CH)
                del dz_CK
            if gw_acc is not None:
                grad_w[v0:v1] = gw_acc
        grad_h = None
        if need_h:
            if _tp_size(ctx.tp_group) > 1:  # hidden is replicated: sum the vocab shards' shares
                dist.all_reduce(gh_acc, group=ctx.tp_group)
            grad_h = gh_acc.to(hidden_TH.dtype)
        return (grad_h, grad_w) + none[2:]


def _check(hidden_TH, weight_VH, labels_T, temperature, token_block=1, vocab_chunk=None) -> None:
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
    if token_block < 1:
        raise ValueError(f"token_block must be >= 1, got {token_block}")
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1 (or None), got {vocab_chunk}")


def token_logprob_entropy(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, tp_group=None,
                          vocab_start: int = 0, temperature: float = 1.0, token_block: int = _DEFAULT_TOKEN_BLOCK,
                          vocab_chunk: Optional[int] = None,
                          backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(logp_T, entropy_T)`` (fp32) over the global vocabulary, without [T, V] logits.

    ``weight_VH`` is this TP rank's rows ``[vocab_start, vocab_start + V_local)`` of the output layer
    (``tp_group=None``: the whole vocabulary); ``labels_T`` are global ids. Differentiable wrt
    ``hidden_TH`` (gradient all-reduced over ``tp_group``) and ``weight_VH`` (local shard).
    Logits are formed ``token_block`` tokens × ``vocab_chunk`` vocab rows at a time (``None``: as many
    rows as fit a 128 MiB fp32 block).
    """
    _check(hidden_TH, weight_VH, labels_T, temperature, token_block, vocab_chunk)
    impl = resolve_backend(backend, hidden_TH.device)
    if impl == "ref":
        return token_logprob_entropy_ref(hidden_TH, weight_VH, labels_T, tp_group, vocab_start, temperature)
    labels_T = labels_T.long().contiguous()
    token_block = min(token_block, max(1, hidden_TH.shape[0]))
    return _TokenLogprobEntropy.apply(hidden_TH, weight_VH, labels_T, tp_group, int(vocab_start),
                                      float(temperature), int(token_block),
                                      _vocab_chunk(token_block, weight_VH.shape[0], vocab_chunk), impl == "triton")


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
