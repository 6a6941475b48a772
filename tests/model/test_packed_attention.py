"""megatron_kimi/model/packed_attention.py: one dispatch, every implementation equal to the reference.

CPU: ``auto`` is the SDPA reference; the Triton kernel (under the interpreter, fp32) is forced and
compared with it, for self-attention packs and for CP-style prefixes (``cu_k`` != ``cu_q``,
bottom-right causal). GPU: PyTorch's ``varlen_attn`` and the Triton kernel against the reference in
bf16, with GQA, and ``varlen_attn`` on prefixes (its causal alignment must be bottom-right too).
"""

from __future__ import annotations

import pytest
import torch

from megatron_kimi.kernels import varlen_attention as va
from megatron_kimi.model.packed_attention import packed_attention, resolve_impl

LENGTHS = [1, 17, 64, 5, 33]


def _packed(lengths, hq, hkv, d, dtype=torch.float32, device="cpu", kv_lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_lengths = kv_lengths or lengths
    cu_q = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(kv_lengths).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lengths), hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(kv_lengths), hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(kv_lengths), hkv, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, cu_q.to(device), cu_k.to(device)


def _naive(q, k, v, cu_q, cu_k, scale, causal=True):
    """Per sample, fp64, explicit bottom-right causal mask (or none) and repeated K/V heads."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for (qs, qe), (ks, ke) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        qi = q[qs:qe].double().cpu().transpose(0, 1)
        ki = k[ks:ke].double().cpu().repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[ks:ke].double().cpu().repeat_interleave(rep, 1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * scale
        if causal:
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
        out[qs:qe] = (s.softmax(-1) @ vi).transpose(0, 1)
    return out


def test_auto_on_cpu_is_the_reference_and_matches_naive():
    q, k, v, cu, _ = _packed(LENGTHS, 4, 2, 16)
    assert resolve_impl("auto", q, same_kv_layout=True) == "ref"
    got = packed_attention(q, k, v, cu, scale=0.25)
    torch.testing.assert_close(got.double(), _naive(q, k, v, cu, cu, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not va._interpreted(), reason="the Triton kernels run on CPU tensors only under the interpreter")
@pytest.mark.parametrize("prefix", [False, True])
def test_forced_triton_matches_reference(prefix):
    """Self-attention packs, and CP prefixes: queries are the last Lq of each sample's Lk keys."""
    kv = [L + extra for L, extra in zip(LENGTHS, (3, 0, 64, 1, 9))] if prefix else None
    q, k, v, cu_q, cu_k = _packed(LENGTHS, 4, 2, 16, kv_lengths=kv)
    cu_k_arg = cu_k if prefix else None
    want = _naive(q, k, v, cu_q, cu_k, 0.3)
    for impl in ("triton", "ref"):
        got = packed_attention(q, k, v, cu_q, cu_k_arg, scale=0.3, impl=impl)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5, msg=lambda m, i=impl: f"{i}: {m}")


@pytest.mark.parametrize("long_pack", [False, True])
def test_non_causal_is_each_segment_whole(long_pack, monkeypatch):
    """The vision tower's attention: every token of a segment sees the whole segment, nothing outside.
    Both reference paths: one masked SDPA call, and (past mask_max_tokens) one call per segment."""
    from megatron_kimi.model import attention

    if long_pack:
        monkeypatch.setattr(attention.varlen_attention_thd_ref, "__defaults__", (0.0, 8, True))
    q, k, v, cu, _ = _packed(LENGTHS, 4, 2, 16)
    got = packed_attention(q, k, v, cu, scale=0.25, causal=False)
    want = _naive(q, k, v, cu, cu, 0.25, causal=False)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got.double() - _naive(q, k, v, cu, cu, 0.25)).abs().max() > 1e-2  # not the causal result
    if va._interpreted():
        got_triton = packed_attention(q, k, v, cu, scale=0.25, causal=False, impl="triton")
        torch.testing.assert_close(got_triton.double(), want, atol=2e-5, rtol=1e-5)


def test_forced_impls_say_why_they_cannot_run():
    q, k, v, cu, _ = _packed([4, 4], 2, 2, 16)
    with pytest.raises(ValueError, match="varlen"):
        packed_attention(q, k, v, cu, scale=0.25, impl="torch")  # CPU fp32: no flash kernel
    with pytest.raises(ValueError, match="dropout"):
        packed_attention(q, k, v, cu, scale=0.25, impl="triton", dropout_p=0.1)
    with pytest.raises(ValueError, match="auto|torch|triton|ref"):
        packed_attention(q, k, v, cu, scale=0.25, impl="flash")
    assert resolve_impl("auto", q, True, dropout_p=0.1) == "ref"


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("prefix", [False, True])
def test_gpu_impls_match_reference(impl, prefix):
    from megatron_kimi.model.packed_attention import _torch_varlen

    if impl == "torch" and _torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    lengths = [1, 300, 2049, 77, 1024]
    kv = [L + extra for L, extra in zip(lengths, (5, 0, 128, 1, 500))] if prefix else None
    q, k, v, cu_q, cu_k = _packed(lengths, 8, 2, 128, dtype=torch.bfloat16, device="cuda", kv_lengths=kv)
    if not prefix:
        assert resolve_impl("auto", q, True) == ("torch" if _torch_varlen() else "triton")
    got = packed_attention(q, k, v, cu_q, cu_k if prefix else None, scale=128 ** -0.5, impl=impl)
    want = _naive(q, k, v, cu_q.cpu(), cu_k.cpu(), 128 ** -0.5)
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)  # bf16 inputs and output
    if not prefix:  # the vision tower's non-causal segments
        got = packed_attention(q, k, v, cu_q, scale=128 ** -0.5, impl=impl, causal=False)
        want = _naive(q, k, v, cu_q.cpu(), cu_q.cpu(), 128 ** -0.5, causal=False)
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)
