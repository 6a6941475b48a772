"""The inference forward of a Megatron ``GPTModel``, walked module by module over a slot KV cache.

Same parameters as training (no conversion, no copy): the embedding, every layer's norms and
linear weights and the output layer are read from the live modules. Per layer::

    x -> input_layernorm -> linear_qkv -> split per query group [q heads of g, k_g, v_g]
      -> RoPE (q and k, each token at its own position) -> write k, v into the slot cache
      -> attention (SDPA over the slot's cache, length / causal mask, GQA) -> linear_proj -> + x
      -> pre_mlp_layernorm -> linear_fc1 -> silu(first half) * second half -> linear_fc2 -> + x

then ``final_layernorm`` and the output layer (tied: the embedding weight). This is the arithmetic of
Megatron's ``SelfAttention`` / ``MLP`` / ``TransformerLayer`` / ``GPTModel`` (RoPE as
``apply_rotary_pos_emb``'s unfused bshd path, from the model's own ``rotary_pos_emb`` frequencies);
tests check it against the trainer's forward.

Tensor parallelism: each TP rank holds its local heads / FFN columns / vocab rows. Megatron's local
``ColumnParallelLinear`` / ``RowParallelLinear`` are applied as a plain GEMM with the local weight
(row-parallel outputs all-reduced over the TP group, then the bias added, as Megatron does); any
other linear module (Transformer Engine's) is called as a module. Vocab-parallel logits are gathered
to the full (padded) vocabulary. Pipeline and context parallelism are not supported.

CPU hot-loop choices (both exact up to fp32 rounding; tests cover the alternatives too): GEMMs of a
few rows as ``W @ x.T`` (see ``small_rows``), and decode attention as two batched matmuls over the
cache views (``decode_attention="bmm"``; SDPA on GPU).

Token layout: the runner works on flat token rows ``[T, hidden]`` (no sequence/batch split).
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP

from megatron_kimi.model.norm import RMSNorm
from megatron_kimi.model.packed_attention import packed_attention
from megatron_kimi.rollout.kv_cache import SlotKVCache


def unwrap_gpt_model(model) -> GPTModel:
    """A GPTModel from a GPTModel, a DDP / Float16Module wrapper, or a one-chunk list of those."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"generation needs exactly one model chunk (no pipeline / virtual pipeline "
                             f"parallelism), got {len(model)} chunks")
        model = model[0]
    m = model
    while not isinstance(m, GPTModel) and hasattr(m, "module"):
        m = m.module
    if not isinstance(m, GPTModel):
        raise TypeError(f"expected a megatron.core GPTModel (or a wrapper of one), got {type(model).__name__}")
    return m


def _rope(t: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, rot: int) -> torch.Tensor:
    """Megatron's unfused non-interleaved RoPE on the first ``rot`` dims: t * cos + rotate_half(t) * sin.

    rotate_half(t) * sin = cat(-x2, x1) * cat(s, s) = roll(t, rot/2) * cat(-s, s) (``sin_signed``),
    bit for bit (a sign flip is exact), with one op fewer.
    """
    if rot < t.shape[-1]:
        t, t_pass = t[..., :rot], t[..., rot:]
    else:
        t_pass = None
    out = (t * cos) + (torch.roll(t, rot // 2, dims=-1) * sin_signed)
    return out if t_pass is None else torch.cat((out, t_pass), dim=-1)


class _Layer:
    """References to one transformer layer's modules and weights (nothing copied)."""

    def __init__(self, layer, config):
        attn = layer.self_attention
        for name in ("q_layernorm", "k_layernorm"):
            norm = getattr(attn, name, None)
            if norm is not None and not isinstance(norm, IdentityOp):
                raise NotImplementedError(f"generation does not support {name}")
        if not isinstance(layer.mlp, MLP):
            raise NotImplementedError(f"generation supports dense MLP layers only, got {type(layer.mlp).__name__}")
        self.input_layernorm = layer.input_layernorm
        self.pre_mlp_layernorm = layer.pre_mlp_layernorm
        self.linear_qkv = attn.linear_qkv
        self.linear_proj = attn.linear_proj
        self.linear_fc1 = layer.mlp.linear_fc1
        self.linear_fc2 = layer.mlp.linear_fc2


class MegatronRunner:
    """Prefill / decode forwards of one GPTModel over a :class:`SlotKVCache`."""

    def __init__(self, model, max_seq_len: Optional[int] = None, decode_attention: str = "auto"):
        if decode_attention not in ("auto", "sdpa", "bmm"):
            raise ValueError(f"decode_attention must be auto|sdpa|bmm, got {decode_attention!r}")
        gpt = unwrap_gpt_model(model)
        cfg = gpt.config
        pp = parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        if pp > 1 or (cfg.pipeline_model_parallel_size or 1) > 1:
            raise NotImplementedError("pipeline-parallel generation is not supported: generate with PP=1 "
                                      "(e.g. reshard the checkpoint to TP-only for rollouts)")
        if (cfg.context_parallel_size or 1) > 1:
            raise NotImplementedError("context-parallel generation is not supported")
        if not (gpt.pre_process and gpt.post_process):
            raise NotImplementedError("generation needs a model with both the embedding and the output layer")
        for flag in ("multi_latent_attention", "fp32_residual_connection",
                     "apply_residual_connection_post_layernorm", "rotary_interleaved", "attention_output_gate"):
            if getattr(cfg, flag, False):
                raise NotImplementedError(f"generation does not support config.{flag}=True")
        if getattr(cfg, "num_moe_experts", None):
            raise NotImplementedError("generation does not support MoE layers")
        if gpt.position_embedding_type not in ("rope", "learned_absolute", "none"):
            raise NotImplementedError(f"position_embedding_type={gpt.position_embedding_type!r} is not supported")

        self.gpt = gpt
        self.config = cfg
        self.tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if self.tp > 1 else None
        if cfg.num_query_groups is not None and cfg.num_query_groups < self.tp:
            raise NotImplementedError(f"generation needs num_query_groups ({cfg.num_query_groups}) >= "
                                      f"tensor parallel size ({self.tp})")
        attn0 = gpt.decoder.layers[0].self_attention
        self.heads = attn0.num_attention_heads_per_partition
        self.groups = attn0.num_query_groups_per_partition
        self.per = self.heads // self.groups
        self.head_dim = attn0.hidden_size_per_attention_head
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else self.head_dim ** -0.5
        self.layers: List[_Layer] = [_Layer(layer, cfg) for layer in gpt.decoder.layers]
        self.final_layernorm = gpt.decoder.final_layernorm
        emb = gpt.embedding.word_embeddings
        self.embedding = emb
        self.vocab_start = int(getattr(emb, "vocab_start_index", 0))
        self.vocab_end = int(getattr(emb, "vocab_end_index", emb.weight.shape[0]))
        self.vocab_size = self.vocab_end - self.vocab_start  # local
        self.padded_vocab_size = self.vocab_size * self.tp
        self.position_embeddings = gpt.embedding.position_embeddings if gpt.position_embedding_type == "learned_absolute" else None
        self.max_seq_len = int(max_seq_len or gpt.max_sequence_length)
        if self.position_embeddings is not None and self.max_seq_len > gpt.max_sequence_length:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the learned position embeddings "
                             f"({gpt.max_sequence_length})")
        self.dtype = emb.weight.dtype
        self.device = emb.weight.device
        # Decode attention: on the CPU two batched matmuls over the cache views beat the SDPA kernel
        # for a handful of query rows per KV head; elsewhere SDPA (flash / memory-efficient kernels).
        if decode_attention == "auto":
            decode_attention = "bmm" if self.device.type == "cpu" else "sdpa"
        self.decode_attention = decode_attention
        # Prefill follows the model's own packed-attention choice (model.attention_impl).
        self.prefill_attention = getattr(attn0.core_attention, "impl", "auto")
        # CPU GEMM with few rows: ``W @ x.T`` streams the [out, in] weight as it lies, while
        # ``x @ W.T`` (F.linear) repacks it on every call -- up to 2x slower for the handful of rows of
        # a decode step. Same weights, same dot products (only the blocking / rounding may differ).
        self.small_rows = 64 if self.device.type == "cpu" else 0

        act = cfg.activation_func
        gated = cfg.gated_linear_unit
        clamp = getattr(cfg, "activation_func_clamp_value", None)
        offset = getattr(cfg, "glu_linear_offset", 0.0) or 0.0
        if getattr(cfg, "use_te_activation_func", False):
            raise NotImplementedError("generation does not support use_te_activation_func")

        def mlp_act(x):
            if not gated:
                return act(x)
            g, u = torch.chunk(x, 2, dim=-1)
            if clamp is not None:
                g = g.clamp(min=None, max=clamp)
                u = u.clamp(min=-clamp, max=clamp)
            return act(g) * (u + offset) if offset else act(g) * u

        self._mlp_act = mlp_act
        self._any_module_linear = False
        for lay in self.layers:
            for mod in (lay.linear_qkv, lay.linear_proj, lay.linear_fc1, lay.linear_fc2):
                if not isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
                    self._any_module_linear = True
        if self._any_module_linear and cfg.sequence_parallel and self.tp > 1:
            raise NotImplementedError("generation with Transformer Engine layers needs sequence_parallel=False")

        # RoPE tables [max_seq_len, rot] from the model's own rotary module (same frequencies).
        self.rot = 0
        if gpt.position_embedding_type == "rope":
            with torch.no_grad():
                freqs = gpt.rotary_pos_emb.get_emb(self.max_seq_len)[:, 0, 0, :].to(self.device)
            self.rot = freqs.shape[-1]
            self.cos = torch.cos(freqs).to(self.dtype)
            sin = torch.sin(freqs).to(self.dtype)
            half = self.rot // 2
            if not torch.equal(sin[:, :half], sin[:, half:]):
                raise NotImplementedError("generation expects non-interleaved RoPE (cos/sin = cat(f, f))")
            self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # signed for _rope

    # ------------------------------------------------------------------ building blocks

    def output_weight(self) -> torch.Tensor:
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ weight[out, in].T -> [T, out] (possibly a transposed view, see small_rows)."""
        if x.shape[0] <= self.small_rows:
            return torch.mm(weight, x.t()).t()
        return F.linear(x, weight)

    def _linear(self, mod, x: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, ColumnParallelLinear):
            y = self._matmul(x, mod.weight)
            return y if mod.bias is None else y + mod.bias
        if isinstance(mod, RowParallelLinear):
            y = self._matmul(x, mod.weight)
            if self.tp > 1:
                y = self._all_reduce(y.contiguous())
            return y if mod.bias is None else y + mod.bias
        y, bias = mod(x.unsqueeze(1))  # any other Megatron linear (TE): [s, b=1, h]
        y = y.squeeze(1)
        return y if bias is None else y + bias

    def _norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """Our RMSNorm module's arithmetic in one fused op for fp32 (same result), else the module."""
        if type(norm) is RMSNorm and x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm(x)

    def _qkv(self, lay: _Layer, x: torch.Tensor):
        mixed = self._linear(lay.linear_qkv, self._norm(lay.input_layernorm, x))
        return mixed.view(x.shape[0], self.groups, self.per + 2, self.head_dim)

    def _qk_rope(self, qkv: torch.Tensor, cos, sin) -> torch.Tensor:
        """q and k heads of every group ([T, g, per+1, d]) with RoPE applied."""
        qk = qkv[:, :, : self.per + 1]
        if self.rot == 0:
            return qk
        return _rope(qk, cos, sin, self.rot)

    def _mlp_block(self, lay: _Layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + self._linear(lay.linear_proj, attn_out)
        h = self._mlp_act(self._linear(lay.linear_fc1, self._norm(lay.pre_mlp_layernorm, x)))
        return x + self._linear(lay.linear_fc2, h)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        w = self.embedding.weight
        if self.tp > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            x = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), w)
            x = self._all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))
        else:
            x = F.embedding(ids, w)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(pos)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + output layer for rows ``x`` [N, h] -> full (padded) vocab logits [N, V]."""
        x = self._norm(self.final_layernorm, x)
        out = self.gpt.output_layer
        if isinstance(out, ColumnParallelLinear):
            y = self._matmul(x, self.output_weight()).contiguous()
            if out.bias is not None:
                y = y + out.bias
        else:
            y, bias = out(x.unsqueeze(1), weight=self.output_weight() if self.gpt.share_embeddings_and_output_weights else None)
            y = y.squeeze(1) if bias is None else (y + bias).squeeze(1)
        if self.tp > 1:
            y = gather_from_tensor_model_parallel_region(y.contiguous())
        return y

    # ------------------------------------------------------------------ cache

    def new_cache(self, slots: int) -> SlotKVCache:
        return SlotKVCache(len(self.layers), slots, self.groups, self.max_seq_len, self.head_dim,
                           self.dtype, self.device)

    # ------------------------------------------------------------------ forwards

    def image_embeddings(self, x_TH: torch.Tensor, pos_T: torch.Tensor, lens: Sequence[int],
                         images: Sequence) -> torch.Tensor:
        """``x`` with the prompts' image features at their placeholder positions (a VLM: the tower and
        projector of the same model, on its current weights; plus the learned absolute position, as the
        trainer adds it after the splice). ``images[k]``: prompt k's ImageInputs or None."""
        from megatron_kimi.model.vision.vlm import ImageInputs, KimiVLModel

        if not isinstance(self.gpt, KimiVLModel):
            raise ValueError("a request has images but the model has no vision tower (model.vision)")
        pix, grids, index, rows = [], [], [], 0
        for n, im in zip(lens, images):
            if im is not None:
                idx = im.token_index_BS.reshape(-1).to(x_TH.device)
                assert idx.numel() == n, (idx.numel(), n)
                pix.append(im.pixel_values_N3PP)
                grids.append(im.grid_thw)
                index.append(torch.where(idx >= 0, idx + rows, idx))
                rows += int(im.grid_thw.prod(-1).sum()) // self.gpt.vision.merge_kernel_size ** 2
            else:
                index.append(torch.full((n,), -1, dtype=torch.long, device=x_TH.device))
        features_MH = self.gpt.image_features(ImageInputs(torch.cat(pix).to(x_TH.device), torch.cat(grids)))
        index_T = torch.cat(index)
        assert features_MH.shape[0] == rows, (features_MH.shape, rows)
        at = index_T >= 0
        rows_TH = features_MH[index_T[at]].to(x_TH.dtype)
        if self.position_embeddings is not None:
            rows_TH = rows_TH + self.position_embeddings(pos_T[at])
        x_TH = x_TH.clone()
        x_TH[at] = rows_TH
        return x_TH

    def prefill(self, cache: SlotKVCache, prompts: Sequence[Sequence[int]], slot0: int,
                images: Optional[Sequence] = None) -> torch.Tensor:
        """Run the prompts (into slots ``slot0..slot0+K-1``, empty before); logits of each last token [K, V].
        ``images``: per prompt, its ImageInputs or None (a VLM's image prompts)."""
        dev = self.device
        lens = [len(p) for p in prompts]
        K, P, T = len(prompts), max(lens), sum(lens)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
        lens_t = torch.tensor(lens, device=dev)
        seq = torch.repeat_interleave(torch.arange(K, device=dev), lens_t)
        starts = torch.cumsum(lens_t, 0) - lens_t
        pos = torch.arange(T, device=dev) - starts[seq]
        slot = seq + slot0
        cos = sin = None
        if self.rot:
            cos = self.cos[pos].view(T, 1, 1, self.rot)
            sin = self.sin[pos].view(T, 1, 1, self.rot)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
        x = self.embed(ids, pos)
        if images is not None and any(im is not None for im in images):
            x = self.image_embeddings(x, pos, lens, images)
        hq, d = self.heads, self.head_dim
        for li, lay in enumerate(self.layers):
            qkv = self._qkv(lay, x)
            qk = self._qk_rope(qkv, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[slot, :, pos] = qk[:, :, self.per]
            vc[slot, :, pos] = qkv[:, :, self.per + 1]
            q = qk[:, :, : self.per].reshape(T, hq, d)
            # The prompts are packed (THD): the same attention dispatch as the trainer's packed batches.
            o = packed_attention(q, qk[:, :, self.per], qkv[:, :, self.per + 1], cu, scale=self.scale, max_q=P,
                                 impl=self.prefill_attention)
            x = self._mlp_block(lay, x, o.reshape(T, hq * d))
        return self.logits(x[starts + lens_t - 1])

    def decode(self, cache: SlotKVCache, tokens: torch.Tensor, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """One token for each of the active slots ``0..B-1``: token ``tokens[b]`` at ``positions[b]``.

        ``max_len`` = max(positions) + 1 (attention reads cache positions ``< max_len``). Returns [B, V].
        """
        B = tokens.shape[0]
        dev = self.device
        L = max_len
        G = B * self.groups
        visible = torch.arange(L, device=dev)[None, :] <= positions[:, None]  # [B, L]
        if self.decode_attention == "sdpa":
            mask = visible.view(B, 1, 1, L)
        else:  # additive mask [B*g, 1, L], built once per step
            mask = torch.zeros(B, L, dtype=self.dtype, device=dev).masked_fill_(~visible, float("-inf"))
            mask = mask.view(B, 1, 1, L).expand(B, self.groups, 1, L).reshape(G, 1, L)
        cos = sin = None
        if self.rot:
            cos = self.cos[positions].view(B, 1, 1, self.rot)
            sin = self.sin[positions].view(B, 1, 1, self.rot)
        rows = torch.arange(B, device=dev)
        x = self.embed(tokens, positions)
        per, d = self.per, self.head_dim
        for li, lay in enumerate(self.layers):
            qkv = self._qkv(lay, x)
            qk = self._qk_rope(qkv, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[rows, :, positions] = qk[:, :, per]
            vc[rows, :, positions] = qkv[:, :, per + 1]
            # The q heads of a group attend to that group's k/v: [B, g, per, d] x [B, g, L, d].
            if self.decode_attention == "sdpa":
                o = F.scaled_dot_product_attention(qk[:, :, :per], kc[:B, :, :L], vc[:B, :, :L],
                                                   attn_mask=mask, scale=self.scale)
            else:  # cache views [B*g, L, d] (slots and heads merge into one batch stride: no copy)
                scores = torch.baddbmm(mask, qk[:, :, :per].reshape(G, per, d),
                                       kc[:B, :, :L].reshape(G, L, d).transpose(1, 2), alpha=self.scale)
                o = torch.bmm(torch.softmax(scores, dim=-1), vc[:B, :, :L].reshape(G, L, d))
            x = self._mlp_block(lay, x, o.reshape(B, self.heads * d))
        return self.logits(x)
