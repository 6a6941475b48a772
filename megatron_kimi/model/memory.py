"""Per-GPU memory estimate for a config and layout (``tools/plan_memory.py``).

Counted in bytes for the most loaded rank (the first pipeline stage holds the most activations, the
last the logits; both are taken at their worst):

* **weights** ``P_stage · b_w`` (b_w = 2 for bf16/fp16, 4 for fp32), P_stage = the stage's layers / TP
  plus the embedding (and the output layer when untied) / TP;
* **grads** Megatron DDP's main-grad buffer: 4 bytes (``grad_reduce_in_fp32``) else b_w;
* **optimizer** Adam m, v (+ fp32 master weights for bf16/fp16): 8 or 12 bytes per parameter,
  divided by DP×CP under the distributed optimizer;
* **activations** per token per layer, saved for backward (bf16, flash-style attention that keeps no
  s² scores), from the Llama layer: norm/residual-stream tensors 5h (RMSNorm keeps its input and the
  normalised fp32 rows), Q/K/V h + 2·h_kv, attention output + LSE h, MLP 4f (fc1's gate/up outputs,
  silu(gate) of the unfused SwiGLU, fc2's input) -> 2·(7h + 2h_kv + 4f) bytes per token per layer,
  divided by TP (sequence parallel splits the norm/residual part too; without SP it stays whole).
  Selective recompute (core attention) frees nothing here: flash-style attention keeps no scores and
  the attention output is kept by ``linear_proj`` anyway (measured); full recompute keeps only each
  layer's input (2h). Tokens per rank = seq_length / CP; the first stage holds
  ``min(PP, microbatches)`` micro-batches in flight (×(1 + (PP−1)/(PP·VPP)) interleaved), i.e. about
  one full model's worth;
* **CP K/V gather**: the all-gathered K/V prefixes kept for attention's backward, ≈ 2·2·h_kv/TP ·
  s·(1 + 1/(2CP)) bytes per layer (one layer's worth under full recompute);
* **backward transient**: one layer's activation gradients in flight (≈ its saved activations;
  under full recompute it is the recomputed layer's working set, counted once);
* **logits** on the last stage: the logits (b_w) + the fp32 softmax the loss keeps (its gradient is
  formed in place) ≈ (b_w + 4) bytes · tokens · V/TP
  (the fused log-prob kernel of megatron_kimi.kernels would make this ~0 for RL);
* **vision** (a VLM, ``model.vision``; first stage): the tower's and projector's weights, grads and
  optimizer state (as above; TP-sharded linears / TP, the rest replicated) and its activations per
  patch per layer 2·(8D + 2F)/TP (two LayerNorm inputs, Q/K/V, attention out + LSE, fc1 out and the
  unfused GELU's input) times the patches of the micro-batches in flight. Patches per micro-batch:
  ``image_patches``, by default the worst case, every token an image token (merge² patches each);
* **overhead**: CUDA context, NCCL buffers, workspaces ≈ 3 GiB, plus 10 % allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_kimi.config import ModelConfig, ParallelConfig, RecomputeConfig
from megatron_kimi.model.flops import head_dim

GIB = 2**30
H100_GIB = 80.0
OVERHEAD_BYTES = 3 * GIB
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int] = None
    sequence_parallel: bool = True
    distributed_optimizer: bool = True


@dataclass
class MemoryPlan:
    parts: Dict[str, float]  # bytes
    layout: Layout
    seq_length: int
    capacity_gib: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity_gib * GIB


def stage_params(m: ModelConfig, vocab: int, layout: Layout) -> float:
    h, d = m.hidden_size, head_dim(m)
    n, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    layer = h * (n * d + 2 * g * d) + n * d * h + 3 * h * m.ffn_hidden_size + 2 * h
    layers_per_stage = math.ceil(m.num_layers / layout.pp)
    emb = vocab * h
    # first stage: embedding; last stage: output layer (tied: a copy lives there too under PP>1)
    ends = emb if layout.pp > 1 else emb * (1 if m.tie_word_embeddings else 2)
    return (layers_per_stage * layer + ends) / layout.tp


def activation_bytes_per_token_layer(m: ModelConfig, layout: Layout, recompute: RecomputeConfig) -> float:
    h, f = m.hidden_size, m.ffn_hidden_size
    h_kv = (m.num_query_groups or m.num_attention_heads) * head_dim(m)
    if recompute.granularity == "full":
        return 2 * h / (layout.tp if layout.sequence_parallel else 1)
    split = 2 * (3 * h + 2 * h_kv + 4 * f) / layout.tp  # Q/K/V, attention out, MLP: TP-sharded
    replicated = 2 * 5 * h  # norm/residual tensors: sharded only under sequence parallel
    replicated /= layout.tp if layout.sequence_parallel else 1
    # selective (core-attention) recompute frees only unfused attention's s^2 scores, never counted
    # here: its output is kept by linear_proj anyway (measured: same peak as no recompute)
    return split + replicated


def plan(m: ModelConfig, vocab: int, layout: Layout, seq_length: int, dtype: str, recompute: RecomputeConfig,
         num_microbatches: int, grad_reduce_in_fp32: bool = True, capacity_gib: float = H100_GIB,
         overhead_bytes: float = OVERHEAD_BYTES, image_patches: Optional[int] = None) -> MemoryPlan:
    bw = 4 if dtype == "fp32" else 2
    p = stage_params(m, vocab, layout)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    opt_bytes = 8 if dtype == "fp32" else 12
    tokens = seq_length / layout.cp
    act_scale = bw / 2  # the per-token counts above are for 2-byte activations
    per_layer = activation_bytes_per_token_layer(m, layout, recompute) * act_scale
    layers_per_stage = math.ceil(m.num_layers / layout.pp)
    in_flight = min(layout.pp, num_microbatches)
    if layout.vpp and layout.pp > 1:
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    acts = per_layer * tokens * layers_per_stage * in_flight
    one_layer = activation_bytes_per_token_layer(m, layout, RecomputeConfig()) * act_scale * tokens
    h_kv = (m.num_query_groups or m.num_attention_heads) * head_dim(m)
    cp_kv = 0.0
    if layout.cp > 1:  # kept per layer; under full recompute only the layer being recomputed holds it
        per_layer_kv = bw * 2 * h_kv / layout.tp * seq_length * (1 + 1 / (2 * layout.cp))
        cp_kv = per_layer_kv * (1 if recompute.granularity == "full" else layers_per_stage * in_flight)
    logits = (bw + 4) * tokens * vocab / layout.tp  # logits + fp32 softmax (grad in place)
    parts = {
        "weights": p * bw,
        "grads": p * (4 if grad_reduce_in_fp32 else bw),
        "optimizer": p * opt_bytes / shard,
        "activations": acts,
        "bwd_transient": one_layer,
        "cp_kv_gather": cp_kv,
        "logits": logits,
        "overhead": overhead_bytes,
    }
    if m.vision is not None:
        parts["vision"] = vision_bytes(m, layout, dtype, grad_reduce_in_fp32, opt_bytes / shard, in_flight,
                                       seq_length * m.vision.merge_kernel_size ** 2 if image_patches is None
                                       else image_patches)
    parts["fragmentation"] = FRAGMENTATION * sum(v for k, v in parts.items() if k != "overhead")
    return MemoryPlan(parts=parts, layout=layout, seq_length=seq_length, capacity_gib=capacity_gib)


def vision_bytes(m: ModelConfig, layout: Layout, dtype: str, grad_reduce_in_fp32: bool, opt_bytes: float,
                 in_flight: float, patches: int) -> float:
    """The tower + projector on the first stage: weights, grads, optimizer state, activations."""
    from megatron_kimi.model.flops import vision_num_params

    v = m.vision
    bw = 4 if dtype == "fp32" else 2
    D, F, K = v.hidden_size, v.ffn_hidden_size, v.merge_kernel_size ** 2
    sharded = v.num_layers * (4 * D * D + 2 * D * F) + (K * D) ** 2 + K * D * m.hidden_size
    params = vision_num_params(m) - sharded + sharded / layout.tp
    static = params * (bw + (4 if grad_reduce_in_fp32 else bw) + opt_bytes)
    per_patch_layer = 2 * (8 * D + 2 * F) / layout.tp * (bw / 2)
    return static + per_patch_layer * v.num_layers * patches * in_flight


def layout_from(parallel: ParallelConfig, world_size: int) -> Layout:
    mp = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % mp:
        raise ValueError(f"world size {world_size} is not divisible by tp x pp x cp = {mp}")
    return Layout(tp=parallel.tensor, pp=parallel.pipeline, cp=parallel.context, dp=world_size // mp,
                  vpp=parallel.virtual_pipeline, sequence_parallel=parallel.sequence_parallel or parallel.tensor == 1,
                  distributed_optimizer=parallel.distributed_optimizer)


def format_plan(pl: MemoryPlan, title: str) -> str:
    lay = pl.layout
    lines = [title,
             f"layout tp {lay.tp} x pp {lay.pp} x cp {lay.cp} x dp {lay.dp}"
             + (f" (vpp {lay.vpp})" if lay.vpp else "")
             + f"; seq_length {pl.seq_length} ({pl.seq_length // lay.cp} tokens per rank)", ""]
    for k, v in pl.parts.items():
        lines.append(f"  {k:<14} {v / GIB:8.2f} GiB")
    lines.append(f"  {'total':<14} {pl.total / GIB:8.2f} GiB of {pl.capacity_gib:.0f} GiB -> "
                 + ("fits" if pl.fits else "DOES NOT FIT"))
    return "\n".join(lines)
