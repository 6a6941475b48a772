"""The packed (THD) reference attention: mask path == per-sample path == plain causal SDPA per sample."""

import torch
import torch.nn.functional as F

from megatron_kimi.model.attention import varlen_attention_thd_ref


def test_thd_paths_agree_with_per_sample_sdpa():
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 5, 30]
    T, hq, hkv, d = sum(lengths), 4, 2, 16
    q = torch.randn(T, hq, d, generator=g)
    k = torch.randn(T, hkv, d, generator=g)
    v = torch.randn(T, hkv, d, generator=g)
    cu = torch.tensor([0, 1, 18, 23, 53], dtype=torch.int32)
    a = varlen_attention_thd_ref(q, k, v, cu, d**-0.5)
    b = varlen_attention_thd_ref(q, k, v, cu, d**-0.5, mask_max_tokens=0)
    ref = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
        ref[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    assert torch.allclose(a, ref, atol=1e-6) and torch.allclose(b, ref, atol=1e-6)
