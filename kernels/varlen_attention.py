"""Varlen (packed THD) causal flash attention in Triton: forward + backward, returning the LSE.

Layout: ``q_THD [Tq, Hq, D]``, ``k_THD / v_THD [Tk, Hkv, D]`` (``Hq % Hkv == 0``; query head ``h``
reads kv head ``h // (Hq // Hkv)``), ``cu_seqlens_q / cu_seqlens_k [n+1]`` (int32 or int64,
monotonic, ``cu[0] == 0``). Segment ``i`` of q (``q[cu_q[i]:cu_q[i+1]]``) attends only to keys
``k[cu_k[i]:cu_k[i+1]]``; ``cu_seqlens_k=None`` means ``cu_seqlens_q`` (self-attention on a packed
batch). Tokens past ``cu_q[-1]`` get output 0 and ``lse = -inf`` (keys past ``cu_k[-1]``: zero grads).

Causal masking is BOTTOM-RIGHT aligned (flash-attn >= 2.1): with ``Lq, Lk`` the segment's query
and key lengths, query row ``i`` sees keys ``j <= i + (Lk - Lq)``. ``Lq == Lk`` is ordinary causal;
``Lq < Lk`` is a query chunk attending to its whole prefix (context parallelism). Rows that see no
key (``Lq > Lk``) give output 0, ``lse = -inf`` and zero gradients.

Returns ``(out_THD, lse_HT)``: ``out`` in q's dtype, ``lse_HT[h, t] = log sum_j exp(scale * q_t.k_j)``
in float32 (natural log). Both are differentiable: the backward takes ``dlse`` too (ring attention
merges partial results through the LSE): ``dS = P * (dP - Delta + dlse)``, ``Delta = rowsum(dO * O)``.

Algorithm: FlashAttention-2.

* forward: one program per (q block, q head); loop over k blocks with the online softmax in base 2
  (``exp2``, scale folded with log2(e)). The k loop is split into an unmasked part (blocks fully
  below the diagonal) and a masked part (diagonal / ragged end); blocks fully above the causal
  diagonal are never visited.
* backward: ``_bwd_preprocess_kernel`` computes ``Delta' = rowsum(dO*O) - dlse`` (so ``dlse`` folds
  into the usual ``dS = P * (dP - Delta')``); ``_bwd_dkdv_kernel`` runs one program per (k block,
  kv head), looping over the query heads of its GQA group and over the q blocks that see it, so
  dK/dV are summed in registers (no atomics, no [Tk, Hq, D] buffer); ``_bwd_dq_kernel`` runs one
  program per (q block, q head) over the k blocks, like the forward. Like the forward, both split
  their loops into blocks that straddle the diagonal or a ragged end (masked) and blocks that are
  fully visible (no mask, no bounds checks). Everything is deterministic.

Varlen bookkeeping: a small int32 table ``[n_programs, 2] = (segment, block start)`` built ON THE
DEVICE with a few torch ops (cumsum + searchsorted + argsort; no host sync, so no ``.tolist()``
on cu_seqlens). Its length is the upper bound ``cdiv(T, BLOCK) + n_segments`` (each segment wastes
at most one partial block); rows past the real block count hold segment -1 and their programs exit
at once. The table is sorted by the work of each block (number of keys / queries it visits),
heaviest first, and the 1-D grid is ``table rows x heads`` with heads fastest, so the long
diagonal blocks of the long samples start first (longest-processing-time scheduling).

Dispatch (``backend="auto"``): Triton for CUDA tensors; on CPU the PyTorch reference, unless the
kernels were defined under ``TRITON_INTERPRET=1`` (Triton reads it when ``@triton.jit`` decorates,
i.e. at this module's import), then the interpreter runs them (tests do this; fp32 only there:
bf16 ``tl.dot`` is wrong under the interpreter). ``backend="triton"`` / ``"ref"`` force one.
Triton is imported guarded: without it the module imports and the reference works.

Triton path constraints: D a power of two in [16, 128]; fp16 / bf16 / fp32 (fp32 dots use
``input_precision="ieee"``, not tf32). cu_seqlens are trusted on CUDA (checking them would sync).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

try:  # guarded: the module (and the reference) must import where triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a test dependency
    triton = None
    tl = None

__all__ = ["varlen_attention", "varlen_attention_ref"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                   lo, hi, Lk, diag, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            rows64 = cols.to(tl.int64)
            k_ptrs = k_base + rows64[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + rows64[:, None] * stride_vt + offs_d[None, :]
            if MASK:
                k = tl.load(k_ptrs, mask=(cols < Lk)[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [M, N], log2 units
            if MASK:
                valid = cols[None, :] < Lk
                if CAUSAL:
                    valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASK:
                v = tl.load(v_ptrs, mask=(cols < Lk)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, TABLE,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_lh, H, GROUP, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        h = pid % H
        row = pid // H
        seg = tl.load(TABLE + 2 * row)
        if seg < 0:
            return
        start_m = tl.load(TABLE + 2 * row + 1)
        q_start = tl.load(CU_Q + seg)
        Lq = tl.load(CU_Q + seg + 1) - q_start
        k_start = tl.load(CU_K + seg)
        Lk = tl.load(CU_K + seg + 1) - k_start
        diag = Lk - Lq
        kh = h // GROUP

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mmask = offs_m < Lq
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mmask[:, None], other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + kh * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kh * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + diag), 0)
            n_full = tl.maximum(tl.minimum(start_m + diag + 1, Lk), 0) // BLOCK_N * BLOCK_N
        else:
            hi = Lk
            n_full = Lk // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                   offs_d, 0, n_full, Lk, diag, qk_scale, False, CAUSAL, BLOCK_N, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n,
                                   offs_d, n_full, hi, Lk, diag, qk_scale, True, CAUSAL, BLOCK_N, PREC)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mmask[:, None])
        tl.store(LSE + h.to(tl.int64) * stride_lh + q_rows, lse, mask=mmask)

    @triton.jit
    def _bwd_preprocess_kernel(O, DO, LSE, DLSE, DELTA, T,
                               stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                               BLOCK_M: tl.constexpr, D: tl.constexpr):
        """DELTA[h, t] = rowsum(dO * O) - dlse (0 on rows that saw no key)."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        mmask = offs_m < T
        rows = offs_m.to(tl.int64)
        o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                    mask=mmask[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=mmask[:, None], other=0.0).to(tl.float32)
        lh = h.to(tl.int64) * stride_lh + rows
        lse = tl.load(LSE + lh, mask=mmask, other=0.0)
        dlse = tl.load(DLSE + lh, mask=mmask, other=0.0)
        delta = tl.sum(o * do, 1) - dlse
        delta = tl.where(lse == float("-inf"), 0.0, delta)
        tl.store(DELTA + lh, delta, mask=mmask)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, h, stride_qt, stride_qh, stride_dot, stride_doh,
                    stride_lh, offs_n, offs_m0, offs_d, lo, hi, Lq, diag, qk_scale,
                    CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
        """dK/dV of one k block from q blocks [lo, hi). Query rows past Lq (BOUNDS) load q = dO = 0 and
        Delta = 0, so they add exactly nothing; key rows past Lk are never stored, so they need no mask."""
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q_rows = (q_start + offs_m).to(tl.int64)
            q_ptrs = Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
            do_ptrs = DO + q_rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :]
            lh = h.to(tl.int64) * stride_lh + q_rows
            if BOUNDS:
                mmask = offs_m < Lq
                q = tl.load(q_ptrs, mask=mmask[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=mmask[:, None], other=0.0)
                lse = tl.load(LSE + lh, mask=mmask, other=0.0)
                delta = tl.load(DELTA + lh, mask=mmask, other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(LSE + lh)
                delta = tl.load(DELTA + lh)
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # no key seen: p = 0
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [N, M], log2 units
            pT = tl.exp2(sT - lse[None, :])
            if CAUSAL_MASK:
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, TABLE,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_lh, H_KV, GROUP, qk_scale, sm_scale,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         D: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        kh = pid % H_KV
        row = pid // H_KV
        seg = tl.load(TABLE + 2 * row)
        if seg < 0:
            return
        start_n = tl.load(TABLE + 2 * row + 1)
        q_start = tl.load(CU_Q + seg)
        Lq = tl.load(CU_Q + seg + 1) - q_start
        k_start = tl.load(CU_K + seg)
        Lk = tl.load(CU_K + seg + 1) - k_start
        diag = Lk - Lq

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        nmask = offs_n < Lk
        k_rows = (k_start + offs_n).to(tl.int64)
        k = tl.load(K + k_rows[:, None] * stride_kt + kh * stride_kh + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        v = tl.load(V + k_rows[:, None] * stride_vt + kh * stride_vh + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        # q blocks [lo, mid) straddle the diagonal (causal mask); from mid on every row sees the whole
        # k block; q blocks past the last full one [q_full, Lq) need bounds masks only.
        if CAUSAL:
            lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M  # first row that sees key start_n
            last = tl.minimum(start_n + BLOCK_N, Lk) - 1
            mid = tl.minimum(tl.cdiv(tl.maximum(last - diag, 0), BLOCK_M) * BLOCK_M, Lq)
        else:
            lo = 0
            mid = 0
        q_full = Lq // BLOCK_M * BLOCK_M
        for g in range(0, GROUP):
            h = kh * GROUP + g
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, h, stride_qt, stride_qh, stride_dot,
                                 stride_doh, stride_lh, offs_n, offs_m0, offs_d, lo, mid, Lq, diag, qk_scale,
                                 True, True, BLOCK_M, PREC)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, h, stride_qt, stride_qh, stride_dot,
                                 stride_doh, stride_lh, offs_n, offs_m0, offs_d, mid, q_full, Lq, diag, qk_scale,
                                 False, False, BLOCK_M, PREC)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, h, stride_qt, stride_qh, stride_dot,
                                 stride_doh, stride_lh, offs_n, offs_m0, offs_d, tl.maximum(mid, q_full), Lq, Lq,
                                 diag, qk_scale, False, True, BLOCK_M, PREC)
        dk = dk * sm_scale
        tl.store(DK + k_rows[:, None] * stride_dkt + kh * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=nmask[:, None])
        tl.store(DV + k_rows[:, None] * stride_dvt + kh * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=nmask[:, None])

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d, lo, hi,
                  Lk, diag, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr):
        """dQ of one q block from k blocks [lo, hi); MASK: bounds (and, if CAUSAL, the diagonal)."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n0
            rows64 = cols.to(tl.int64)
            k_ptrs = k_base + rows64[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + rows64[:, None] * stride_vt + offs_d[None, :]
            if MASK:
                cmask = cols < Lk
                k = tl.load(k_ptrs, mask=cmask[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=cmask[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            if MASK:
                valid = cmask[None, :]
                if CAUSAL:
                    valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
                p = tl.where(valid, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, TABLE,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                       H, GROUP, qk_scale, sm_scale,
                       CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       D: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        h = pid % H
        row = pid // H
        seg = tl.load(TABLE + 2 * row)
        if seg < 0:
            return
        start_m = tl.load(TABLE + 2 * row + 1)
        q_start = tl.load(CU_Q + seg)
        Lq = tl.load(CU_Q + seg + 1) - q_start
        k_start = tl.load(CU_K + seg)
        Lk = tl.load(CU_K + seg + 1) - k_start
        diag = Lk - Lq
        kh = h // GROUP

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mmask = offs_m < Lq
        q_rows = (q_start + offs_m).to(tl.int64)
        # rows past Lq: q = dO = 0, Delta = 0 -> dS = 0 (and their dQ is not stored)
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mmask[:, None], other=0.0)
        do = tl.load(DO + q_rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=mmask[:, None], other=0.0)
        lh = h.to(tl.int64) * stride_lh + q_rows
        lse = tl.load(LSE + lh, mask=mmask, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + lh, mask=mmask, other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + kh * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kh * stride_vh
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        # k blocks [0, n_full) are below the diagonal for every row of this q block: no masks there
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + diag), 0)
            n_full = tl.maximum(tl.minimum(start_m + diag + 1, Lk), 0) // BLOCK_N * BLOCK_N
        else:
            hi = Lk
            n_full = Lk // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d, 0, n_full,
                       Lk, diag, qk_scale, False, CAUSAL, BLOCK_N, PREC)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d, n_full, hi,
                       Lk, diag, qk_scale, True, CAUSAL, BLOCK_N, PREC)
        dq = dq * sm_scale
        tl.store(DQ + q_rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mmask[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


def _config(D: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel.

    Interpreter: 64 x 64 (its cost is per program-iteration, numpy over a block is nearly free;
    tests patch this function to cover other tiles). GPU, fp16/bf16: the forward keeps a 128 x D q
    tile resident and streams 64-row k/v tiles (measured on an H200 at the speed of torch's
    varlen_attn). The backward uses the asymmetric tiles of Triton's fused-attention tutorial: dK/dV
    keeps a 128-row k/v block resident and streams 32-row q/dO tiles (half the q/dO re-reads of a
    64-row k block, and small [128, 32] P/dS tiles), dQ the mirror image, both deeply pipelined.
    ``kernels/benchmarks/bench_attention.py --sweep`` times other tiles on the GPU at hand."""
    if _interpreted():
        return dict(fwd=(64, 64, 1, 1), dkdv=(64, 64, 1, 1), dq=(64, 64, 1, 1), pre=64)
    big = D > 64
    if dtype == torch.float32:  # 2x the shared memory per element, ieee dots: small tiles
        return dict(fwd=(64, 32, 4, 2), dkdv=(32, 32, 4, 2), dq=(32, 32, 4, 2), pre=64)
    return dict(fwd=(128, 64, 8 if big else 4, 2 if big else 3),
                dkdv=(32, 128, 8 if big else 4, 3 if big else 5),
                dq=(128, 32, 8 if big else 4, 3 if big else 5),
                pre=64)


def _block_table(cu_a: torch.Tensor, cu_b: torch.Tensor, T_a: int, block: int, causal: bool,
                 q_side: bool) -> torch.Tensor:
    """int32 [rows, 2] (segment, block start) over the blocks of side ``a``, heaviest first.

    ``q_side``: ``a`` is the query side (cu_a = cu_q, cu_b = cu_k), else the key side. Built with
    device ops only (no host sync); ``rows = cdiv(T_a, block) + n`` is an upper bound and the rows
    past the real block count hold segment -1 (their programs exit at once).
    """
    n = cu_a.numel() - 1
    La = (cu_a[1:] - cu_a[:-1]).long()
    Lb = (cu_b[1:] - cu_b[:-1]).long()
    nb = (La + block - 1) // block
    ends = torch.cumsum(nb, 0)
    rows = (T_a + block - 1) // block + n
    p = torch.arange(rows, device=cu_a.device, dtype=torch.long)
    seg = torch.searchsorted(ends, p, right=True)
    valid = seg < n
    segc = seg.clamp(max=n - 1)
    start = (p - (ends - nb)[segc]) * block
    la, lb = La[segc], Lb[segc]
    if q_side:  # keys visited by q block [start, start + block)
        work = (torch.minimum(lb, start + block + lb - la).clamp(min=0)) if causal else lb
    else:  # queries visited by k block [start, start + block); diag = la - lb here
        work = (lb - (start - (la - lb)).clamp(min=0)).clamp(min=0) if causal else lb
    work = torch.where(valid, work, torch.full_like(work, -1))
    order = torch.argsort(work, descending=True, stable=True)
    table = torch.stack([torch.where(valid, segc, torch.full_like(segc, -1)), start], 1)
    return table[order].to(torch.int32).contiguous()


# Block tables of self-attention packs, per cu_seqlens tensor. Every layer of a micro-batch (and its
# backward) passes the same cu_seqlens object, so the ~20 small ops of a table run once per micro-batch
# instead of three times per layer (measured: ~30 ms of a 120 ms small-model step on an H200). Weakly
# keyed by identity: an entry dies with its tensor; ``_version`` catches in-place edits.
_TABLE_MEMO: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _block_table_memo(cu_a: torch.Tensor, cu_b: torch.Tensor, T_a: int, block: int, causal: bool,
                      q_side: bool) -> torch.Tensor:
    if cu_b is not cu_a:  # prefixes (context parallelism): two tensors to key on; rare enough to rebuild
        return _block_table(cu_a, cu_b, T_a, block, causal, q_side)
    version, tables = _TABLE_MEMO.get(cu_a, (None, None))
    if version != cu_a._version:  # new, or edited in place since: older tables are stale
        tables = {}
        _TABLE_MEMO[cu_a] = (cu_a._version, tables)
    key = (T_a, block, causal, q_side)
    if key not in tables:
        tables[key] = _block_table(cu_a, cu_b, T_a, block, causal, q_side)
    return tables[key]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 operands


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd(q, k, v, cu_q, cu_k, scale, causal):
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((Hq, Tq), float("-inf"), device=q.device, dtype=torch.float32)
    if cu_q.numel() <= 1 or Tq == 0:
        return out, lse
    cfg = _config(D, q.dtype)
    bm, bn, warps, stages = cfg["fwd"]
    table = _block_table_memo(cu_q, cu_k, Tq, bm, causal, q_side=True)
    grid = (table.shape[0] * Hq,)
    _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, table,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), lse.stride(0), Hq, Hq // Hkv, scale * _LOG2E,
                      CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=_prec(q.dtype),
                      num_warps=warps, num_stages=stages)
    return out, lse


def _bwd(q, k, v, out, lse, dout, dlse, cu_q, cu_k, scale, causal):
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if cu_q.numel() <= 1 or Tq == 0 or Tk == 0:
        return dq, dk, dv
    cfg = _config(D, q.dtype)
    dout = _unit_last(dout)
    dlse = dlse.contiguous()
    delta = torch.empty_like(lse)
    pre = cfg["pre"]
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre), Hq)](
        out, dout, lse, dlse, delta, Tq, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        lse.stride(0), BLOCK_M=pre, D=D)
    group = Hq // Hkv
    prec = _prec(q.dtype)

    bm, bn, warps, stages = cfg["dkdv"]
    ktable = _block_table_memo(cu_k, cu_q, Tk, bn, causal, q_side=False)
    _bwd_dkdv_kernel[(ktable.shape[0] * Hkv,)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, ktable,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), Hkv, group, scale * _LOG2E, scale,
        CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=prec, num_warps=warps, num_stages=stages)

    bm, bn, warps, stages = cfg["dq"]
    qtable = _block_table_memo(cu_q, cu_k, Tq, bm, causal, q_side=True)
    _bwd_dq_kernel[(qtable.shape[0] * Hq,)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, qtable,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        Hq, group, scale * _LOG2E, scale,
        CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=D, PREC=prec, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class _VarlenAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THD, k_THD, v_THD, cu_q, cu_k, scale, causal):
        out_THD, lse_HT = _fwd(q_THD, k_THD, v_THD, cu_q, cu_k, scale, causal)
        ctx.save_for_backward(q_THD, k_THD, v_THD, out_THD, lse_HT, cu_q, cu_k)
        ctx.scale, ctx.causal = scale, causal
        return out_THD, lse_HT

    @staticmethod
    def backward(ctx, dout_THD, dlse_HT):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if dout_THD is None:
            dout_THD = torch.zeros_like(out)
        if dlse_HT is None:
            dlse_HT = torch.zeros_like(lse)
        dq, dk, dv = _bwd(q, k, v, out, lse, dout_THD, dlse_HT.float(), cu_q, cu_k, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check(q_THD, k_THD, v_THD, cu_q, cu_k):
    if q_THD.dim() != 3 or k_THD.dim() != 3 or v_THD.shape != k_THD.shape:
        raise ValueError(f"want q [Tq, Hq, D], k = v [Tk, Hkv, D]; got {tuple(q_THD.shape)}, "
                         f"{tuple(k_THD.shape)}, {tuple(v_THD.shape)}")
    if k_THD.shape[2] != q_THD.shape[2] or q_THD.shape[1] % k_THD.shape[1]:
        raise ValueError(f"head dims must match and Hq % Hkv == 0; got q {tuple(q_THD.shape)}, "
                         f"k {tuple(k_THD.shape)}")
    if cu_q.dim() != 1 or cu_k.dim() != 1 or cu_q.numel() != cu_k.numel() or cu_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q / _k must be 1-D of equal length n+1; got "
                         f"{tuple(cu_q.shape)}, {tuple(cu_k.shape)}")


def varlen_attention_ref(q_THD, k_THD, v_THD, cu_seqlens_q, cu_seqlens_k=None, softmax_scale=None,
                         causal=True):
    """PyTorch reference (the oracle): per segment, fp32, explicit bottom-right causal mask.

    Returns ``(out_THD in q's dtype, lse_HT float32)``; differentiable (no NaN grads on rows that
    see no key). Memory ``O(H * Lq * Lk)`` per segment.
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    _check(q_THD, k_THD, v_THD, cu_seqlens_q, cu_k)
    Tq, Hq, D = q_THD.shape
    group = Hq // k_THD.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    bq, bk = cu_seqlens_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for i in range(len(bq) - 1):
        qs = q_THD[bq[i]:bq[i + 1]].float()
        ks = k_THD[bk[i]:bk[i + 1]].float().repeat_interleave(group, 1)
        vs = v_THD[bk[i]:bk[i + 1]].float().repeat_interleave(group, 1)
        Lq, Lk = qs.shape[0], ks.shape[0]
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            ii = torch.arange(Lq, device=s.device)[:, None]
            jj = torch.arange(Lk, device=s.device)[None, :]
            mask = jj <= ii + (Lk - Lq)
        else:
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device)
        row_ok = mask.any(-1)  # [Lq]
        s = s.masked_fill(~mask, float("-inf"))
        s = torch.where(row_ok[:, None], s, torch.zeros_like(s))  # finite rows -> finite grads
        lse_f = torch.logsumexp(s, -1)  # [H, Lq]
        p = torch.where(mask, torch.exp(s - lse_f[..., None]), torch.zeros_like(s))
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
        lses.append(torch.where(row_ok, lse_f, torch.full_like(lse_f, float("-inf"))))
    tail = Tq - bq[-1]
    outs.append(q_THD.new_zeros(tail, Hq, D, dtype=torch.float32))
    lses.append(torch.full((Hq, tail), float("-inf"), device=q_THD.device))
    return torch.cat(outs, 0).to(q_THD.dtype), torch.cat(lses, 1)


def varlen_attention(q_THD, k_THD, v_THD, cu_seqlens_q, cu_seqlens_k=None, softmax_scale=None,
                     causal=True, backend="auto"):
    """Packed (THD) flash attention; returns ``(out_THD, lse_HT)``. See the module docstring.

    backend: ``"auto"`` (Triton on CUDA, or on CPU when the kernels were defined under
    ``TRITON_INTERPRET=1``; else the reference), ``"triton"`` or ``"ref"``.
    """
    if backend not in ("auto", "triton", "ref"):
        raise ValueError(f"backend must be auto / triton / ref, got {backend!r}")
    if backend == "auto":
        use_triton = triton is not None and (q_THD.is_cuda or (q_THD.device.type == "cpu" and _interpreted()))
        backend = "triton" if use_triton else "ref"
    if backend == "ref":
        return varlen_attention_ref(q_THD, k_THD, v_THD, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    if triton is None:
        raise RuntimeError("backend='triton' needs triton installed")
    if not q_THD.is_cuda and not _interpreted():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "megatron_kimi.kernels.varlen_attention is imported")
    cu_q = cu_seqlens_q
    cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k
    _check(q_THD, k_THD, v_THD, cu_q, cu_k)
    D = q_THD.shape[2]
    if D < 16 or D > 128 or D & (D - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim in [16, 128], got {D}")
    if q_THD.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (
            q_THD.dtype == k_THD.dtype == v_THD.dtype):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q_THD.dtype}, "
                         f"{k_THD.dtype}, {v_THD.dtype}")
    if not q_THD.is_cuda:  # interpreter: checking is free (no device sync)
        bq, bk = cu_q.tolist(), cu_k.tolist()
        if bq[0] != 0 or bk[0] != 0 or any(b < a for a, b in zip(bq, bq[1:])) or any(
                b < a for a, b in zip(bk, bk[1:])) or bq[-1] > q_THD.shape[0] or bk[-1] > k_THD.shape[0]:
            raise ValueError(f"bad cu_seqlens: q {bq}, k {bk}")
    cu_q = cu_q.to(device=q_THD.device, dtype=torch.int32).contiguous()
    cu_k = cu_k.to(device=q_THD.device, dtype=torch.int32).contiguous()
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = _unit_last(q_THD), _unit_last(k_THD), _unit_last(v_THD)
    return _VarlenAttentionFn.apply(q, k, v, cu_q, cu_k, scale, bool(causal))
