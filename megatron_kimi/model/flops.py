"""Model FLOPs of the decoder (for TFLOP/s and MFU) and parameter counts, from the config alone.

Counted per token, forward, as 2 x multiply-accumulates of every matmul: QKV, attention scores and
values, output projection, MLP (SwiGLU: 3 matrices), logits. Attention is counted *causally* (a token
at position i attends to i+1 keys, so a sample of length L costs L(L+1)/2 key-value pairs, not L^2)
and *per sample* for packed sequences: this is the work a causal varlen kernel really does. Training
= 3 x forward (backward = 2 x forward); activation recomputation is not counted (model FLOPs, the
MFU convention), so recompute shows up as lower MFU.

A VLM (``model.vision``) adds its tower per image of an ``h x w`` patch grid: the patch embedding,
``L_v`` pre-LN ViT layers over ``h*w`` patches with *full* (non-causal) attention inside the image, and
the projector over ``h*w/merge^2`` merged tokens.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from megatron_kimi.config import ModelConfig


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def dense_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Forward FLOPs per token of everything but the attention core (independent of length)."""
    h, d = m.hidden_size, head_dim(m)
    n, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    qkv = 2 * h * (n * d + 2 * g * d)
    proj = 2 * n * d * h
    mlp = 2 * 3 * h * m.ffn_hidden_size  # SwiGLU: gate, up, down
    return m.num_layers * (qkv + proj + mlp) + 2 * h * vocab_size


def attention_flops(m: ModelConfig, lengths: Iterable[int]) -> float:
    """Forward FLOPs of causal attention (QK^T and AV) over samples of the given lengths."""
    pairs = sum(L * (L + 1) // 2 for L in lengths)
    return m.num_layers * 2 * 2 * m.num_attention_heads * head_dim(m) * pairs


def vision_flops(m: ModelConfig, grids: Iterable[tuple]) -> float:
    """Forward FLOPs of the vision tower + projector over images of patch grids ``(h, w)``."""
    v = m.vision
    if v is None:
        return 0.0
    D, F, K = v.hidden_size, v.ffn_hidden_size, v.merge_kernel_size ** 2
    total = 0.0
    for h, w in grids:
        n = h * w
        dense = 2 * 3 * v.patch_size ** 2 * D + v.num_layers * (2 * 4 * D * D + 2 * 2 * D * F)
        scores = v.num_layers * 2 * 2 * D * n * n  # QK^T and AV, every patch against the whole image
        projector = (n // K) * (2 * (K * D) ** 2 + 2 * K * D * m.hidden_size)
        total += n * dense + scores + projector
    return total


def training_flops(m: ModelConfig, vocab_size: int, lengths: Iterable[int], image_grids: Iterable[tuple] = ()) -> float:
    """Model FLOPs of one forward+backward over samples of the given lengths (and images, for a VLM)."""
    lengths = list(lengths)
    return 3.0 * (dense_flops_per_token(m, vocab_size) * sum(lengths) + attention_flops(m, lengths)
                  + vision_flops(m, image_grids))


def num_params(m: ModelConfig, vocab_size: int) -> int:
    h, d = m.hidden_size, head_dim(m)
    n, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    attn = h * (n * d + 2 * g * d) + n * d * h + (n * d + 2 * g * d if m.add_qkv_bias else 0)
    mlp = 3 * h * m.ffn_hidden_size
    norms = 2 * h
    emb = vocab_size * h * (1 if m.tie_word_embeddings else 2)
    pos = m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute" else 0
    return m.num_layers * (attn + mlp + norms) + h + emb + pos + vision_num_params(m)


def vision_num_params(m: ModelConfig) -> int:
    """The tower's and projector's parameters (0 without ``model.vision``)."""
    v = m.vision
    if v is None:
        return 0
    D, F, K = v.hidden_size, v.ffn_hidden_size, v.merge_kernel_size ** 2
    layer = (3 * D * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 4 * D  # qkv, proj, fc1, fc2, 2 LNs
    tower = 3 * v.patch_size ** 2 * D + D + v.position_grid_size ** 2 * D + v.num_layers * layer + 2 * D
    projector = 2 * D + (K * D) ** 2 + K * D + K * D * m.hidden_size + m.hidden_size
    return tower + projector


# Dense peak TFLOP/s per device (no sparsity), by name fragment and dtype. fp32 means TF32 tensor cores.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 80GB HBM3": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
}


def peak_tflops(device_name: Optional[str], dtype: str) -> Optional[float]:
    if not device_name:
        return None
    for key, table in PEAK_TFLOPS.items():
        if key in device_name:
            return table.get(dtype)
    return None


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocab up to a multiple of lcm(divisible_by, tp).

    Unlike Megatron-LM (multiple of divisible_by * tp) the padding does not change with TP when
    divisible_by is already a multiple of tp, so layouts share one embedding shape.
    """
    step = divisible_by * tp // math.gcd(divisible_by, tp)
    return int(math.ceil(vocab_size / step) * step)
