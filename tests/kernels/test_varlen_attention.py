"""Triton varlen flash attention (fwd + bwd, with LSE) vs the PyTorch reference.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before this module imports them), in fp32 only: bf16 ``tl.dot`` is wrong
under the interpreter. The bf16/fp16 check runs on CUDA (``@pytest.mark.gpu``).

Tolerances: fp32 kernel vs fp32 reference differ only by summation order (online softmax, blocked
dot products, dK/dV summed over GQA heads): observed errors are ~1e-6, so 1e-4 abs/rel leaves room
for the 1000-key rows. bf16/fp16 (GPU): inputs and P/dS are rounded to 8 / 11 mantissa bits before
the tensor-core dots (the reference computes in fp32 from the same rounded inputs), so the max
error is checked relative to the largest reference entry (2e-2; bf16 epsilon is 7.8e-3).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

import megatron_kimi.kernels.varlen_attention as va  # noqa: E402
from megatron_kimi.kernels.varlen_attention import varlen_attention, varlen_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not va._interpreted():
    pytest.skip("no GPU and the kernels were not defined under TRITON_INTERPRET=1", allow_module_level=True)

FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(Tq, Tk, hq, hkv, d, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Tq, hq, d, generator=g)
    k = torch.randn(Tk, hkv, d, generator=g)
    v = torch.randn(Tk, hkv, d, generator=g)
    go = torch.randn(Tq, hq, d, generator=g)
    gl = torch.randn(hq, Tq, generator=g)  # upstream grad of the lse (ring-attention merging)
    q, k, v, go = (x.to(device=device, dtype=dtype) for x in (q, k, v, go))
    return q, k, v, go, gl.to(device)


def _run(fn, q, k, v, go, gl, cu_q, cu_k, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v, cu_q, cu_k, **kw)
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (go, gl))
    return out, lse, dq, dk, dv


def _assert_close(name, a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    if "max_rel" in tol:  # half precision: max error relative to the reference's largest entry
        err, ref_max = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
        assert err <= tol["max_rel"] * max(ref_max, 1e-3), f"{name}: max err {err} vs max |ref| {ref_max}"
        return
    torch.testing.assert_close(a.float(), b.float(), msg=lambda m: f"{name}: {m}", **tol)


def _compare(cu_q, cu_k, Tq, Tk, hq, hkv, d, causal=True, seed=0, dtype=torch.float32, tol=FP32_TOL,
             device=DEVICE):
    q, k, v, go, gl = _inputs(Tq, Tk, hq, hkv, d, seed, dtype, device)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=device)
    ck = None if cu_k is None else torch.tensor(cu_k, dtype=torch.int32, device=device)
    got = _run(varlen_attention, q, k, v, go, gl, cq, ck, causal=causal, backend="triton")
    ref = _run(varlen_attention_ref, q, k, v, go, gl, cq, ck, causal=causal)
    out, lse = got[0], got[1]
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (hq, Tq)
    # rows that see no key (tail past cu_q[-1], Lq > Lk): -inf lse, zero output, in both
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[1]))
    dead = torch.isneginf(lse)
    assert not torch.isnan(lse).any()
    _assert_close("lse", lse.masked_fill(dead, 0), ref[1].masked_fill(dead, 0), tol)
    assert (out.transpose(0, 1)[dead] == 0).all() and (got[2].transpose(0, 1)[dead] == 0).all()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        if name != "lse":
            _assert_close(name, a, b, tol)
    tail_q, tail_k = cu_q[-1], (cu_q if cu_k is None else cu_k)[-1]
    assert (out[tail_q:] == 0).all() and (got[2][tail_q:] == 0).all()
    assert (got[3][tail_k:] == 0).all() and (got[4][tail_k:] == 0).all()
    return got, ref


# (cu_q, cu_k, Tq, Tk, hq, hkv, d, causal)
CASES = {
    # self-attention, uneven segments (lengths 1, 17, 32, 1, 79), 5 trailing tokens, GQA 4/2
    "self_gqa_d32": ([0, 1, 18, 50, 51, 130], None, 135, 135, 4, 2, 32, True),
    "self_mha_d64": ([0, 1, 18, 50, 51, 130], None, 130, 130, 2, 2, 64, True),
    # bottom-right causal, Lq <= Lk (context parallel: queries see their whole prefix), k tail
    "prefix_gqa_d64": ([0, 1, 18, 50, 51, 130], [0, 5, 40, 72, 160, 239], 133, 245, 4, 2, 64, True),
    # Lq > Lk (first rows see nothing), an empty q segment and an empty k segment, Lk = 0
    "rows_see_nothing": ([0, 40, 40, 57, 90], [0, 20, 33, 50, 50], 92, 50, 2, 1, 32, True),
    "self_d128": ([0, 17, 40], None, 40, 40, 2, 1, 128, True),
    "noncausal": ([0, 1, 18, 50, 51, 130], [0, 5, 40, 72, 160, 239], 130, 239, 4, 2, 32, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    _compare(*CASES[case][:7], causal=CASES[case][7])


def test_long_sample_1000():
    # one 1000-token sample (plus a 7-token one and a 3-token tail): many k blocks per q block,
    # the unmasked / diagonal split of the forward and the q-block loop of dK/dV
    _compare([0, 7, 1007], None, 1010, 1010, 2, 1, 32)


def _tiles(fwd, dkdv, dq):
    return lambda D, dtype: dict(fwd=fwd, dkdv=dkdv, dq=dq, pre=16)


@pytest.mark.parametrize("tiles", [
    ((16, 32, 1, 1), (32, 16, 1, 1), (16, 32, 1, 1)),  # small, rectangular both ways
    ((128, 64, 1, 1), (32, 128, 1, 1), (128, 32, 1, 1)),  # the fp16/bf16 GPU tiles
    ((32, 32, 1, 1), (16, 64, 1, 1), (64, 16, 1, 1)),  # several masked + unmasked blocks per sample
], ids=["small_rect", "gpu_tiles", "asym_small"])
@pytest.mark.parametrize("case", ["self_gqa_d32", "prefix_gqa_d64", "rows_see_nothing"])
def test_other_tiles(monkeypatch, tiles, case):
    if DEVICE != "cpu":
        pytest.skip("tile override is an interpreter check")
    monkeypatch.setattr(va, "_config", _tiles(*tiles))
    _compare(*CASES[case][:7], causal=CASES[case][7], seed=1)


def test_block_table_covers_every_block_once():
    cu_q = torch.tensor([0, 1, 18, 18, 50, 51, 130], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 40, 40, 72, 160, 239], dtype=torch.int32)
    for q_side, (cu_a, cu_b, T) in ((True, (cu_q, cu_k, 135)), (False, (cu_k, cu_q, 239))):
        table = va._block_table(cu_a, cu_b, T, 16, True, q_side)
        assert table.dtype == torch.int32 and table.shape[1] == 2
        real = {tuple(r) for r in table.tolist() if r[0] >= 0}
        want = {(i, s) for i in range(len(cu_a) - 1) for s in range(0, int(cu_a[i + 1] - cu_a[i]), 16)}
        assert real == want and len(real) == int((table[:, 0] >= 0).sum())
        assert (table[:, 0] >= 0).tolist() == sorted((table[:, 0] >= 0).tolist(), reverse=True)


def test_reference_matches_model_thd_ref():
    from megatron_kimi.model.attention import varlen_attention_thd_ref

    cu = torch.tensor([0, 1, 18, 50, 51, 130], dtype=torch.int32)
    q, k, v, _, _ = _inputs(130, 130, 4, 2, 32, device="cpu")
    out, lse = varlen_attention_ref(q, k, v, cu)
    for mask_max_tokens in (4096, 0):  # block-diagonal-mask path and per-sample path
        torch.testing.assert_close(out, varlen_attention_thd_ref(q, k, v, cu, 32 ** -0.5, 0.0, mask_max_tokens),
                                   atol=1e-5, rtol=1e-5)
    # with trailing tokens the per-sample path gives 0, like ours
    q2, k2, v2, _, _ = _inputs(135, 135, 4, 2, 32, device="cpu")
    torch.testing.assert_close(varlen_attention_ref(q2, k2, v2, cu)[0],
                               varlen_attention_thd_ref(q2, k2, v2, cu, 32 ** -0.5, 0.0, 0), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_reference_bottom_right_against_sdpa():
    # one segment Lq=5 < Lk=9 and one Lq=6 > Lk=3 vs SDPA with an explicit bottom-right mask
    cu_q, cu_k = torch.tensor([0, 5, 11]), torch.tensor([0, 9, 12])
    q, k, v, _, _ = _inputs(11, 12, 2, 2, 16, device="cpu")
    out, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, softmax_scale=0.3)
    for (a, b), (c, e) in zip(((0, 5), (5, 11)), ((0, 9), (9, 12))):
        Lq, Lk = b - a, e - c
        mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        qs, ks, vs = q[a:b].transpose(0, 1), k[c:e].transpose(0, 1), v[c:e].transpose(0, 1)
        s = (qs @ ks.transpose(1, 2) * 0.3).masked_fill(~mask, float("-inf"))
        ok = mask.any(-1)
        want = torch.nn.functional.scaled_dot_product_attention(qs[:, ok], ks, vs, attn_mask=mask[ok], scale=0.3)
        torch.testing.assert_close(out[a:b][ok].transpose(0, 1), want, atol=1e-5, rtol=1e-5)
        assert (out[a:b][~ok] == 0).all()
        torch.testing.assert_close(lse[:, a:b], torch.logsumexp(s, -1))


def test_dispatch_and_inputs(monkeypatch):
    q, k, v, _, _ = _inputs(40, 40, 2, 1, 32)
    cu = torch.tensor([0, 17, 40], dtype=torch.int64, device=DEVICE)  # int64 accepted
    calls = []
    real_fwd = va._fwd
    monkeypatch.setattr(va, "_fwd", lambda *a: calls.append(1) or real_fwd(*a))
    out, lse = varlen_attention(q, k, v, cu)  # auto: Triton (CUDA, or the CPU interpreter)
    assert calls == [1]
    ref_out, ref_lse = varlen_attention(q, k, v, cu, backend="ref")
    assert calls == [1]
    torch.testing.assert_close(out, ref_out, **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse, **FP32_TOL)
    # non-contiguous heads (a view into a fused qkv buffer) give the same result
    qkv = torch.cat([q, k, v], 1)
    out2, _ = varlen_attention(qkv[:, :2], qkv[:, 2:3], qkv[:, 3:4], cu, backend="triton")
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        varlen_attention(q[..., :24], k[..., :24], v[..., :24], cu, backend="triton")
    with pytest.raises(ValueError, match="Hq % Hkv"):
        varlen_attention(q, torch.cat([k, k, k], 1), torch.cat([v, v, v], 1), cu, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["self_gqa_d32", "prefix_gqa_d64", "rows_see_nothing", "self_d128"])
def test_cuda_half_precision(dtype, case):
    tol = dict(max_rel=2e-2)
    _compare(*CASES[case][:7], causal=CASES[case][7], dtype=dtype, tol=tol, device="cuda")
    # a long sample at the GPU tiles
    _compare([0, 3000, 4096], None, 4100, 4100, 8, 2, 128, dtype=dtype, tol=tol, device="cuda")


def test_block_tables_are_built_once_per_cu_seqlens(monkeypatch):
    """Layers share one cu_seqlens tensor: its three tables (fwd, dK/dV, dQ) are built once, not per call;
    an in-place edit of the tensor rebuilds them, and prefix (cu_k) tables are never memoized."""
    built = []
    real = va._block_table
    monkeypatch.setattr(va, "_block_table", lambda *a, **kw: built.append(a[3:]) or real(*a, **kw))
    cu = torch.tensor([0, 5, 40, 70], dtype=torch.int32, device=DEVICE)
    q, k, v, go, gl = _inputs(70, 70, 2, 1, 16)
    _run(varlen_attention, q, k, v, go, gl, cu, None)
    n = len(built)  # one per distinct (block, side): 3, or 2 where the fwd and dQ tiles share a block
    assert n in (2, 3) and len(set(built)) == n
    _run(varlen_attention, q, k, v, go, gl, cu, None)  # the next "layer"
    assert len(built) == n
    cu[1] = 6  # same object, new contents
    got = _run(varlen_attention, q, k, v, go, gl, cu, None)
    assert len(built) == 2 * n
    want = _run(varlen_attention_ref, q, k, v, go, gl, cu, None)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _assert_close(name, a, b, FP32_TOL)
    cu_k = cu.clone()
    _run(varlen_attention, q, k, v, go, gl, cu, cu_k)
    _run(varlen_attention, q, k, v, go, gl, cu, cu_k)
    assert len(built) == 2 * n + 6
