"""Hugging Face (Llama / Qwen2) <-> Megatron-Core naming, layouts and configs. Pure functions only.

Megatron's *global* tensors (what ``dist_checkpointing`` stores; the same at every TP/PP layout):

==================================================  ===============================================
Megatron (layer i)                                  Hugging Face
==================================================  ===============================================
embedding.word_embeddings.weight [V_pad, h]         model.embed_tokens.weight [V, h] + zero rows
decoder.layers.i.self_attention.linear_qkv          model.layers.i.input_layernorm.weight
  .layer_norm_weight
decoder.layers.i.self_attention.linear_qkv.weight   q_proj / k_proj / v_proj, grouped per KV head:
  (.bias: Qwen2)                                    [ng, (nq/ng + 2) * d, h] = [q heads of g, k_g, v_g]
decoder.layers.i.self_attention.linear_proj.weight  self_attn.o_proj.weight
decoder.layers.i.mlp.linear_fc1.layer_norm_weight   post_attention_layernorm.weight
decoder.layers.i.mlp.linear_fc1.weight              cat([mlp.gate_proj, mlp.up_proj], 0) (silu(first))
decoder.layers.i.mlp.linear_fc2.weight              mlp.down_proj.weight
decoder.final_layernorm.weight                      model.norm.weight
output_layer.weight [V_pad, h] (untied only)        lm_head.weight [V, h] + zero rows
==================================================  ===============================================

Every Megatron tensor is described as a list of :class:`Segment` s: row ranges of HF tensors (or
zero rows) stacked along dim 0. That one description serves both directions: filling any row slice
of a Megatron shard straight from safetensors (``hf_to_mcore``), and splitting a full Megatron tensor
back into HF tensors (``mcore_to_hf``). Columns (dims >= 1) are never rearranged.

Kimi-K2.5 (``model_type: kimi_k25``) uses this table for its text model under ``model.language_model.``
plus the vision tower's: :mod:`megatron_kimi.convert.kimi_k25`, :mod:`megatron_kimi.convert.vision`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_kimi.config import ModelConfig

SUPPORTED_ARCHITECTURES: Dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Files copied along with the weights (tokenizer and chat template).
TOKENIZER_FILES: Tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_KEYS: Tuple[str, ...] = (
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted (names the tensor / field and the file)."""


# --------------------------------------------------------------------------------------------
# Architecture description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The shape facts both converters need (derived from a ModelConfig)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int  # the HF (unpadded) vocabulary
    padded_vocab_size: int  # rows of Megatron's embedding / output layer
    qkv_bias: bool
    tied: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


def arch_from_model_config(m: ModelConfig, padded_vocab_size: int, vocab_size: Optional[int] = None) -> Arch:
    vocab = vocab_size if vocab_size is not None else m.vocab_size
    if vocab is None:
        raise ConversionError("model.vocab_size is not set: pass the vocabulary size explicitly")
    if vocab > padded_vocab_size:
        raise ConversionError(f"vocab_size={vocab} exceeds the padded vocabulary {padded_vocab_size}")
    return Arch(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_heads=m.num_attention_heads,
        num_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size,
        qkv_bias=m.add_qkv_bias,
        tied=m.tie_word_embeddings,
    )


# --------------------------------------------------------------------------------------------
# Layout transforms (pure; each with its inverse)
# --------------------------------------------------------------------------------------------


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int,
                   head_dim: int) -> torch.Tensor:
    """HF q/k/v ([nq*d, ...], [ng*d, ...], [ng*d, ...]) -> Megatron's grouped linear_qkv rows.

    Works for weights ([rows, hidden]) and biases ([rows]).
    """
    per = num_heads // num_groups
    rest = q.shape[1:]
    qg = q.reshape(num_groups, per * head_dim, *rest)
    kg = k.reshape(num_groups, head_dim, *rest)
    vg = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_groups * (per + 2) * head_dim, *rest)


def deinterleave_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of :func:`interleave_qkv`: Megatron linear_qkv rows -> (q, k, v)."""
    per = num_heads // num_groups
    rest = qkv.shape[1:]
    g = qkv.reshape(num_groups, (per + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(num_heads * head_dim, *rest).clone(), k.reshape(num_groups * head_dim, *rest).clone(),
            v.reshape(num_groups * head_dim, *rest).clone())


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj -> Megatron linear_fc1 (its GLU applies silu to the first half)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    """Inverse of :func:`merge_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.clone(), up.clone()


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ConversionError(f"vocab {weight.shape[0]} exceeds the padded vocabulary {padded_vocab_size}")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of :func:`pad_vocab`: keep the first ``vocab_size`` rows."""
    return weight[:vocab_size].clone()


# --------------------------------------------------------------------------------------------
# Name mapping as row segments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of HF tensor ``hf_name`` (``None``: that many zero rows)."""

    hf_name: Optional[str]
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_layer_name(name: str) -> Tuple[Optional[int], str]:
    """"decoder.layers.3.mlp.linear_fc2.weight" -> (3, "mlp.linear_fc2.weight"); else (None, name)."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def layer_name(layer: int, key: str) -> str:
    return f"decoder.layers.{layer}.{key}"


def qkv_segments(prefix: str, suffix: str, num_heads: int, num_groups: int, head_dim: int) -> List[Segment]:
    """Megatron linear_qkv rows as HF q/k/v row ranges (``prefix`` = "model.layers.i.self_attn.")."""
    per = num_heads // num_groups
    out: List[Segment] = []
    for g in range(num_groups):
        out.append(Segment(f"{prefix}q_proj.{suffix}", g * per * head_dim, (g + 1) * per * head_dim))
        out.append(Segment(f"{prefix}k_proj.{suffix}", g * head_dim, (g + 1) * head_dim))
        out.append(Segment(f"{prefix}v_proj.{suffix}", g * head_dim, (g + 1) * head_dim))
    return out


def _vocab_segments(hf_name: str, a: Arch) -> List[Segment]:
    segs = [Segment(hf_name, 0, a.vocab_size)]
    if a.padded_vocab_size > a.vocab_size:
        segs.append(Segment(None, 0, a.padded_vocab_size - a.vocab_size))
    return segs


def megatron_segments(name: str, a: Arch) -> List[Segment]:
    """The HF rows that make up Megatron tensor ``name`` (per-layer name), top to bottom."""
    layer, key = split_layer_name(name)
    if layer is None:
        if key == EMBEDDING:
            return _vocab_segments("model.embed_tokens.weight", a)
        if key == FINAL_NORM:
            return [Segment("model.norm.weight", 0, a.hidden_size)]
        if key == OUTPUT_LAYER and not a.tied:
            return _vocab_segments("lm_head.weight", a)
        raise ConversionError(f"no Hugging Face source for Megatron tensor {name!r}")
    if not 0 <= layer < a.num_layers:
        raise ConversionError(f"Megatron tensor {name!r}: layer {layer} out of range (num_layers={a.num_layers})")
    hf = f"model.layers.{layer}."
    if key == "self_attention.linear_qkv.layer_norm_weight":
        return [Segment(hf + "input_layernorm.weight", 0, a.hidden_size)]
    if key == "self_attention.linear_qkv.weight":
        return qkv_segments(hf + "self_attn.", "weight", a.num_heads, a.num_groups, a.head_dim)
    if key == "self_attention.linear_qkv.bias" and a.qkv_bias:
        return qkv_segments(hf + "self_attn.", "bias", a.num_heads, a.num_groups, a.head_dim)
    if key == "self_attention.linear_proj.weight":
        return [Segment(hf + "self_attn.o_proj.weight", 0, a.hidden_size)]
    if key == "mlp.linear_fc1.layer_norm_weight":
        return [Segment(hf + "post_attention_layernorm.weight", 0, a.hidden_size)]
    if key == "mlp.linear_fc1.weight":
        return [Segment(hf + "mlp.gate_proj.weight", 0, a.ffn_hidden_size),
                Segment(hf + "mlp.up_proj.weight", 0, a.ffn_hidden_size)]
    if key == "mlp.linear_fc2.weight":
        return [Segment(hf + "mlp.down_proj.weight", 0, a.hidden_size)]
    raise ConversionError(f"no Hugging Face source for Megatron tensor {name!r}")


def megatron_shapes(a: Arch) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """Checkpoint key -> (global shape without the layer axis, stacked over layers?)."""
    h, qkv_rows = a.hidden_size, (a.num_heads + 2 * a.num_groups) * a.head_dim
    out: Dict[str, Tuple[Tuple[int, ...], bool]] = {EMBEDDING: ((a.padded_vocab_size, h), False)}
    layer = {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.linear_proj.weight": (h, a.num_heads * a.head_dim),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (2 * a.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, a.ffn_hidden_size),
    }
    for key in LAYER_KEYS:
        if key == "self_attention.linear_qkv.bias" and not a.qkv_bias:
            continue
        out[f"decoder.layers.{key}"] = (layer[key], True)
    out[FINAL_NORM] = ((h,), False)
    if not a.tied:
        out[OUTPUT_LAYER] = ((a.padded_vocab_size, h), False)
    return out


def megatron_names(a: Arch) -> List[str]:
    """Every per-layer Megatron tensor name, in HF file order (embedding, layers, norm, output)."""
    shapes = megatron_shapes(a)
    per_layer = [k[len("decoder.layers."):] for k, (_, stacked) in shapes.items() if stacked]
    names = [EMBEDDING] + [layer_name(i, k) for i in range(a.num_layers) for k in per_layer] + [FINAL_NORM]
    return names + ([] if a.tied else [OUTPUT_LAYER])


def hf_shapes(a: Arch) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name -> shape, in the usual HF order."""
    h, d = a.hidden_size, a.head_dim
    out: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, h)}
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", a.num_heads * d), ("k_proj", a.num_groups * d), ("v_proj", a.num_groups * d)):
            out[p + f"self_attn.{proj}.weight"] = (rows, h)
            if a.qkv_bias:
                out[p + f"self_attn.{proj}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, a.num_heads * d)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (a.ffn_hidden_size, h)
        out[p + "mlp.up_proj.weight"] = (a.ffn_hidden_size, h)
        out[p + "mlp.down_proj.weight"] = (h, a.ffn_hidden_size)
    out["model.norm.weight"] = (h,)
    if not a.tied:
        out["lm_head.weight"] = (a.vocab_size, h)
    return out


def is_ignorable_hf_tensor(name: str, a: Arch) -> bool:
    """Tensors some HF checkpoints carry that hold no extra information."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return a.tied and name == "lm_head.weight"  # a tied copy of the embedding


def megatron_from_hf(name: str, get: Callable[[str], torch.Tensor], a: Arch) -> torch.Tensor:
    """Full Megatron tensor ``name`` assembled from HF tensors (``get(hf_name)``)."""
    return assemble_segments(megatron_segments(name, a), get)


def hf_from_megatron(name: str, tensor: torch.Tensor, a: Arch) -> Dict[str, torch.Tensor]:
    """Split full Megatron tensor ``name`` into its HF tensors (padding rows dropped)."""
    return split_segments(name, megatron_segments(name, a), tensor)


def assemble_segments(segs: Sequence[Segment], get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Stack the rows that ``segs`` name (``get(hf_name)`` gives an HF tensor; zeros for padding)."""
    parts = [None if s.hf_name is None else get(s.hf_name)[s.start:s.stop] for s in segs]
    ref = next(p for p in parts if p is not None)
    return torch.cat([p if p is not None else ref.new_zeros(s.rows, *ref.shape[1:]) for p, s in zip(parts, segs)])


def split_segments(name: str, segs: Sequence[Segment], tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`assemble_segments`: full Megatron tensor ``name`` -> {HF name: tensor}."""
    total = sum(s.rows for s in segs)
    if tensor.shape[0] != total:
        raise ConversionError(f"Megatron tensor {name!r} has {tensor.shape[0]} rows, expected {total}")
    pieces: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    row = 0
    for seg in segs:
        if seg.hf_name is not None:
            pieces.setdefault(seg.hf_name, []).append((seg.start, tensor[row:row + seg.rows]))
        row += seg.rows
    out = {}
    for hf_name, items in pieces.items():
        items.sort(key=lambda x: x[0])
        out[hf_name] = torch.cat([t for _, t in items]).contiguous().clone()
    return out


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _fail(field: str, value, why: str) -> None:
    raise ConversionError(f"unsupported Hugging Face config: {field}={value!r} ({why})")


def rope_theta_of(hf: dict) -> float:
    if hf.get("rope_theta") is not None:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 10000.0


def check_supported(hf: dict) -> str:
    """Raise ConversionError naming the first unsupported field; return the model_type."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        _fail("model_type", model_type, f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    archs = hf.get("architectures") or [SUPPORTED_ARCHITECTURES[model_type]]
    if any(x != SUPPORTED_ARCHITECTURES[model_type] for x in archs):
        _fail("architectures", archs, f"supported: {SUPPORTED_ARCHITECTURES[model_type]}")
    if hf.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", hf.get("hidden_act"), "only silu (SwiGLU) is supported")
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            _fail("rope_scaling", scaling, "RoPE scaling is not supported")
    params = hf.get("rope_parameters")
    if params:
        kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else params
        if kind != "default" or not isinstance(params, dict) or "full_attention" in params:
            _fail("rope_parameters", params, "RoPE scaling is not supported")
    prf = hf.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        _fail("partial_rotary_factor", prf, "partial rotary embeddings are not supported")
    if hf.get("use_sliding_window"):
        _fail("use_sliding_window", hf["use_sliding_window"], "sliding-window attention is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        _fail("layer_types", sorted(set(layer_types)), "only full_attention layers are supported")
    if model_type == "llama" and hf.get("attention_bias"):
        _fail("attention_bias", hf["attention_bias"], "o_proj bias is not supported (q/k/v-only bias: Qwen2)")
    if hf.get("mlp_bias"):
        _fail("mlp_bias", hf["mlp_bias"], "MLP biases are not supported")
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            _fail(field, hf.get(field), "a positive integer is required")
    return model_type


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """HF config.json (as a dict) -> our ModelConfig. Unsupported features raise naming the field."""
    model_type = check_supported(hf)
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if heads % groups:
        _fail("num_key_value_heads", groups, f"must divide num_attention_heads={heads}")
    theta = rope_theta_of(hf)
    if theta != int(theta):  # the model builder passes int(rotary_base) to Megatron
        _fail("rope_theta", theta, "a non-integer RoPE base would be truncated by the Megatron builder")
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=hf.get("max_position_embeddings") or 2048,
        position_embedding_type="rope",
        rotary_base=theta,
        rotary_percent=1.0,
        add_qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
    )


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ARCH_FIELDS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "torch_dtype", "dtype",
    "transformers_version", "partial_rotary_factor",
)


def hf_config_from_model_config(m: ModelConfig, model_type: str, vocab_size: int, dtype: torch.dtype = torch.float32,
                                base: Optional[dict] = None) -> dict:
    """Our ModelConfig -> an HF config dict (``base``: the original config.json, for token ids etc.)."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"model_type={model_type!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    if m.position_embedding_type != "rope":
        raise ConversionError(f"model.position_embedding_type={m.position_embedding_type!r}: HF needs rope")
    if m.rotary_percent != 1.0:
        raise ConversionError(f"model.rotary_percent={m.rotary_percent}: HF {model_type} needs 1.0")
    if model_type == "qwen2" and not m.add_qkv_bias:
        raise ConversionError("model.add_qkv_bias=false: Qwen2 always has q/k/v biases (use --model-type llama)")
    if model_type == "llama" and m.add_qkv_bias:
        raise ConversionError("model.add_qkv_bias=true: HF Llama's attention_bias also adds an o_proj bias "
                              "(use --model-type qwen2)")
    out = {k: v for k, v in (base or {}).items() if k not in _ARCH_FIELDS}
    theta = float(m.rotary_base)
    out.update(
        architectures=[SUPPORTED_ARCHITECTURES[model_type]],
        model_type=model_type,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        rope_theta=theta,  # read by transformers < 5
        rope_parameters={"rope_type": "default", "rope_theta": theta},  # transformers >= 5
        tie_word_embeddings=m.tie_word_embeddings,
        hidden_act="silu",
        initializer_range=m.init_method_std,
        attention_dropout=m.attention_dropout,
        dtype=_DTYPE_NAMES[dtype],
        torch_dtype=_DTYPE_NAMES[dtype],
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=(base or {}).get("max_window_layers", m.num_layers))
    return out


def parse_size(size) -> int:
    """"2GB" -> 2e9 bytes, "500MiB" -> 500 * 2**20, 1000 -> 1000."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", s)
    if not m:
        raise ConversionError(f"max shard size {size!r}: expected e.g. 2GB, 500MB, 1GiB or a number of bytes")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_shards(shapes: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype, max_bytes: int) -> List[List[str]]:
    """Group tensors (in order) into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    files: List[List[str]] = [[]]
    used = 0
    item = dtype_nbytes(dtype)
    for name, shape in shapes:
        size = math.prod(shape) * item
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files if files[0] else []
