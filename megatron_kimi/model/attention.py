"""Core attention for the local (non-Transformer-Engine) layer spec, via PyTorch SDPA.

Plugs into Megatron's ``SelfAttention`` as ``core_attention``. Two input layouts:

* sbhd: ``q [s, b, hq, d]``, ``k/v [s, b, hkv, d]`` -> ``[s, b, hq*d]`` (causal).
* thd (packed, ``PackedSeqParams(qkv_format="thd")``): ``q [t, hq, d]`` -> ``[t, hq*d]``; every
  sample ``cu_seqlens[i]:cu_seqlens[i+1]`` attends causally to itself only (no cross-sample
  attention). Under context parallelism (THD only) the rank's zig-zag chunks attend to their
  samples' all-gathered K/V prefixes (megatron_kimi/parallel/context.py).

``AttnMaskType.no_mask`` (the vision tower: every patch of an image sees the whole image) makes the
packed path non-causal, still one segment per image; it has no sbhd or CP path.

GQA: K/V heads are repeated to the query heads. Under tensor parallelism the heads are local.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _repeat_kv(kv: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    return kv if n_rep == 1 else kv.repeat_interleave(n_rep, dim=head_dim)


def causal_attention_bhsd(q_BHSD, k_BHSD, v_BHSD, scale, dropout_p=0.0) -> torch.Tensor:
    """Causal SDPA; GQA handled by repeating K/V heads."""
    n_rep = q_BHSD.shape[1] // k_BHSD.shape[1]
    k_BHSD = _repeat_kv(k_BHSD, n_rep, 1)
    v_BHSD = _repeat_kv(v_BHSD, n_rep, 1)
    return F.scaled_dot_product_attention(
        q_BHSD, k_BHSD, v_BHSD, is_causal=True, scale=scale, dropout_p=dropout_p
    )


def varlen_attention_thd_ref(q_THD, k_THD, v_THD, cu_seqlens: torch.Tensor, scale, dropout_p=0.0,
                             mask_max_tokens: int = 4096, causal: bool = True):
    """Packed attention: [t, h, d] -> [t, h, d]; no token attends across cu_seqlens bounds.

    Up to ``mask_max_tokens`` one SDPA call with a block-diagonal causal mask (fast for many short
    samples); beyond, one SDPA per sample (memory stays O(longest sample^2)).
    """
    T = q_THD.shape[0]
    bounds = cu_seqlens.tolist()
    if T <= mask_max_tokens:
        lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=q_THD.device)
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=q_THD.device), lengths)
        if seg.numel() < T:  # tokens past the last bound form their own segment
            seg = torch.cat([seg, torch.full((T - seg.numel(),), len(lengths), device=q_THD.device)])
        mask = seg[:, None] == seg[None, :]
        if causal:
            mask &= torch.ones(T, T, dtype=torch.bool, device=q_THD.device).tril_()
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q_THD, k_THD, v_THD))
        n_rep = q.shape[1] // k.shape[1]
        k, v = _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
        return o.squeeze(0).transpose(0, 1)
    out = torch.zeros_like(q_THD)  # tokens past the last bound (if any) get no attention output
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        q = q_THD[start:end].transpose(0, 1).unsqueeze(0)
        k = k_THD[start:end].transpose(0, 1).unsqueeze(0)
        v = v_THD[start:end].transpose(0, 1).unsqueeze(0)
        if causal:
            o = causal_attention_bhsd(q, k, v, scale, dropout_p)
        else:
            n_rep = q.shape[1] // k.shape[1]
            o = F.scaled_dot_product_attention(q, _repeat_kv(k, n_rep, 1), _repeat_kv(v, n_rep, 1), scale=scale,
                                               dropout_p=dropout_p)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


class SDPACoreAttention(MegatronModule):
    """Megatron core-attention module (local spec) backed by ``scaled_dot_product_attention``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        impl: str = "auto",
        **unused,
    ):
        super().__init__(config=config)
        self.impl = impl  # packed (THD) attention implementation: megatron_kimi/model/packed_attention.py
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1 and (config.attention_dropout if attention_dropout is None else attention_dropout) > 0:
            raise ValueError("context parallelism: attention dropout is not supported (set model.attention_dropout=0)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPACoreAttention supports causal and no_mask, got {attn_mask_type}")
        self.causal = attn_mask_type != AttnMaskType.no_mask
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        assert attention_bias is None, "attention_bias is not supported"
        p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext():
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                cu = packed_seq_params.cu_seqlens_q_padded
                if cu is None:
                    cu = packed_seq_params.cu_seqlens_q
                if self.cp_size > 1 and self.causal:  # this rank's zig-zag chunks vs. their samples' prefixes
                    from megatron.core import parallel_state

                    from megatron_kimi.parallel.context import cp_attention_thd

                    out_THD = cp_attention_thd(query, key, value, cu, self.softmax_scale,
                                               parallel_state.get_context_parallel_group(), self.impl)
                    return out_THD.reshape(out_THD.shape[0], -1)
                from megatron_kimi.model.packed_attention import packed_attention

                max_q = packed_seq_params.max_seqlen_q
                out_THD = packed_attention(query, key, value, cu, scale=self.softmax_scale,
                                           max_q=None if max_q is None else int(max_q), impl=self.impl, dropout_p=p,
                                           causal=self.causal)
                return out_THD.reshape(out_THD.shape[0], -1)
            if self.cp_size > 1:
                raise ValueError("context parallelism is implemented for packed (THD) batches only")
            if not self.causal:
                raise ValueError("non-causal attention (no_mask) is implemented for packed (THD) batches only")
            # sbhd -> bhsd
            q = query.permute(1, 2, 0, 3)
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
            out_BHSD = causal_attention_bhsd(q, k, v, self.softmax_scale, p)
            s, b = query.shape[0], query.shape[1]
            return out_BHSD.permute(2, 0, 1, 3).reshape(s, b, -1)

