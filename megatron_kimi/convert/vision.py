"""Hugging Face Kimi-K2.5 vision tower + projector <-> Megatron names and layouts. Pure functions only.

==================================================================  ==========================================
Megatron (``vision_model.`` / ``vision_projection.``; layer i)       HF (``model.vision_tower.`` / ``model.mm_projector.``)
==================================================================  ==========================================
vision_model.patch_embed.{weight,bias}                               patch_embed.proj.{weight,bias}
vision_model.position_embedding [G, G, D]                            patch_embed.pos_emb.position_embeddings
vision_model.decoder.layers.i.self_attention.linear_qkv              layers.i.norm1.{weight,bias}
  .layer_norm_{weight,bias}
vision_model.decoder.layers.i.self_attention.linear_qkv.{w,b}        layers.i.attn.{q,k,v}_proj, per head [q, k, v]
vision_model.decoder.layers.i.self_attention.linear_proj.{w,b}       layers.i.attn.proj.{weight,bias}
vision_model.decoder.layers.i.mlp.linear_fc1.layer_norm_{w,b}       layers.i.norm2.{weight,bias}
vision_model.decoder.layers.i.mlp.linear_fc{1,2}.{weight,bias}       layers.i.mlp.fc{1,2}.{weight,bias}
vision_model.decoder.final_layernorm.{weight,bias}                   final_layernorm.{weight,bias}
vision_projection.pre_norm.{weight,bias}                             pre_norm.{weight,bias}
vision_projection.projector.encoder.linear_fc1.{weight,bias}         in_proj.{weight,bias}
vision_projection.projector.encoder.linear_fc2.{weight,bias}         out_proj.{weight,bias}
==================================================================  ==========================================

HF names are transformers' in-memory ``Kimi_K25ForConditionalGeneration`` names (not Moonshot's original
``vision_tower.encoder.blocks.*`` / fused ``wqkv`` layout). Shapes: D tower hidden, F its ffn, G the
position grid, K = merge**2 * D, H the text model's hidden size; ``vision_segments`` gives every Megatron
tensor as HF row ranges (``convert/hf.py``'s ``Segment``), so TP shards of the q/k/v, fc1/fc2 and projector
linears are sliced from safetensors as the LM's are.

The names are the full (unsharded) tensors ``dist_checkpointing`` stores (the checkpoint keys, which
name the layer norms as Transformer Engine's fused layers do, whichever spec built the model); the tower's layers are not
pipeline-split (the whole tower is on the first stage), so layer i is global.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

from megatron_kimi.convert.hf import ConversionError, Segment, qkv_segments
from megatron_kimi.model.vision.config import VisionConfig

HF_TOWER = "model.vision_tower."
HF_PROJECTOR = "model.mm_projector."
_TOWER = "vision_model."
_PROJ = "vision_projection."

# Megatron suffix (under vision_model.decoder.layers.i.) -> HF suffix (under layers.i.), 1:1 tensors.
_LAYER_DIRECT = {
    "self_attention.linear_qkv.layer_norm_weight": "norm1.weight",
    "self_attention.linear_qkv.layer_norm_bias": "norm1.bias",
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "self_attention.linear_proj.bias": "attn.proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "norm2.weight",
    "mlp.linear_fc1.layer_norm_bias": "norm2.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_DIRECT = {
    _TOWER + "patch_embed.weight": HF_TOWER + "patch_embed.proj.weight",
    _TOWER + "patch_embed.bias": HF_TOWER + "patch_embed.proj.bias",
    _TOWER + "position_embedding": HF_TOWER + "patch_embed.pos_emb.position_embeddings",
    _TOWER + "decoder.final_layernorm.weight": HF_TOWER + "final_layernorm.weight",
    _TOWER + "decoder.final_layernorm.bias": HF_TOWER + "final_layernorm.bias",
    _PROJ + "pre_norm.weight": HF_PROJECTOR + "pre_norm.weight",
    _PROJ + "pre_norm.bias": HF_PROJECTOR + "pre_norm.bias",
    _PROJ + "projector.encoder.linear_fc1.weight": HF_PROJECTOR + "in_proj.weight",
    _PROJ + "projector.encoder.linear_fc1.bias": HF_PROJECTOR + "in_proj.bias",
    _PROJ + "projector.encoder.linear_fc2.weight": HF_PROJECTOR + "out_proj.weight",
    _PROJ + "projector.encoder.linear_fc2.bias": HF_PROJECTOR + "out_proj.bias",
}
_LAYER_RE = re.compile(r"^vision_model\.decoder\.layers\.(\d+)\.(.+)$")


def is_vision_name(name: str) -> bool:
    return name.startswith(_TOWER) or name.startswith(_PROJ)


def is_hf_vision_name(name: str) -> bool:
    return name.startswith(HF_TOWER) or name.startswith(HF_PROJECTOR)


def megatron_vision_names(v: VisionConfig) -> List[str]:
    names = list(_DIRECT)
    for i in range(v.num_layers):
        prefix = f"{_TOWER}decoder.layers.{i}."
        names += [prefix + k for k in _LAYER_DIRECT]
        names += [prefix + "self_attention.linear_qkv.weight", prefix + "self_attention.linear_qkv.bias"]
    return names


def _shapes(v: VisionConfig, text_hidden_size: int):
    """({top-level Megatron name: shape}, {per-layer suffix: shape}); the HF tensors have the same shapes."""
    D, F, K, P, G = v.hidden_size, v.ffn_hidden_size, v.merged_size, v.patch_size, v.position_grid_size
    top = dict(zip(_DIRECT, [(D, 3, P, P), (D,), (G, G, D), (D,), (D,), (D,), (D,), (K, K), (K,),
                             (text_hidden_size, K), (text_hidden_size,)]))
    layer = dict(zip(_LAYER_DIRECT, [(D,), (D,), (D, D), (D,), (D,), (D,), (F, D), (F,), (D, F), (D,)]))
    layer.update({"self_attention.linear_qkv.weight": (3 * D, D), "self_attention.linear_qkv.bias": (3 * D,)})
    return top, layer


def megatron_vision_shapes(v: VisionConfig, text_hidden_size: int) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """Checkpoint key -> (global shape without the layer axis, stacked over the tower's layers?)."""
    top, layer = _shapes(v, text_hidden_size)
    out = {k: (shape, False) for k, shape in top.items()}
    out.update({f"{_TOWER}decoder.layers.{k}": (shape, True) for k, shape in layer.items()})
    return out


def hf_vision_shapes(v: VisionConfig, text_hidden_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every HF vision tensor name -> shape."""
    top, layer = _shapes(v, text_hidden_size)
    out = {_DIRECT[k]: shape for k, shape in top.items()}
    D = v.hidden_size
    for i in range(v.num_layers):
        prefix = f"{HF_TOWER}layers.{i}."
        out.update({prefix + hf_key: layer[k] for k, hf_key in _LAYER_DIRECT.items()})
        out.update({prefix + f"attn.{p}_proj.{w}": (D, D) if w == "weight" else (D,)
                    for p in "qkv" for w in ("weight", "bias")})
    return out


def vision_segments(name: str, v: VisionConfig, text_hidden_size: int) -> List[Segment]:
    """Megatron vision tensor ``name`` as HF row ranges (see ``megatron_kimi.convert.hf.Segment``): what
    lets the converters slice TP shards of the tower and projector straight from safetensors."""
    top, layer_shapes = _shapes(v, text_hidden_size)
    if name in _DIRECT:
        return [Segment(_DIRECT[name], 0, top[name][0])]
    m = _LAYER_RE.match(name)
    if m is None or int(m.group(1)) >= v.num_layers or m.group(2) not in layer_shapes:
        raise ConversionError(f"no Hugging Face source for Megatron vision tensor {name!r} "
                              f"(model.vision.num_layers={v.num_layers})")
    layer, key = int(m.group(1)), m.group(2)
    prefix = f"{HF_TOWER}layers.{layer}."
    if key in _LAYER_DIRECT:
        return [Segment(prefix + _LAYER_DIRECT[key], 0, layer_shapes[key][0])]
    return qkv_segments(prefix + "attn.", key.rsplit(".", 1)[1], v.num_attention_heads, v.num_attention_heads,
                        v.head_dim)


def vision_config_from_hf(hf: dict, text_hidden_size: int, **overrides) -> VisionConfig:
    """``model.vision`` from a Kimi-K2.5 ``config.json`` (its ``vision_config`` and projector fields)."""
    vc = hf.get("vision_config") or {}
    if vc.get("pos_emb_height", 64) != vc.get("pos_emb_width", 64):
        raise ValueError(f"vision_config.pos_emb_height/width: only a square position grid is supported, got "
                         f"{vc.get('pos_emb_height')}x{vc.get('pos_emb_width')}")
    merge = vc.get("merge_kernel_size", (2, 2))
    if merge[0] != merge[1]:
        raise ValueError(f"vision_config.merge_kernel_size: only square merges are supported, got {merge}")
    if vc.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"vision_config.hidden_act={vc.get('hidden_act')!r}: only gelu_pytorch_tanh is supported")
    rope = vc.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision_config.rope_parameters.rope_type={rope.get('rope_type')!r}: only axial 2D RoPE "
                         "is supported")
    hidden = vc.get("hidden_size", 1152)
    patch = vc.get("patch_size", 14)
    if not isinstance(patch, int):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"vision_config.patch_size={patch}: only square patches are supported")
        patch = int(patch[0])
    heads = vc.get("num_attention_heads", 16)
    if vc.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"vision_config.head_dim={vc['head_dim']}: must be hidden_size/num_attention_heads")
    if (hf.get("projection_hidden_size") or hidden) != hidden:
        raise ValueError(f"projection_hidden_size={hf.get('projection_hidden_size')} must equal "
                         f"vision_config.hidden_size={hidden} (the projector's LayerNorm is per patch)")
    return VisionConfig(
        num_layers=vc.get("num_hidden_layers", 27), hidden_size=hidden,
        ffn_hidden_size=vc.get("intermediate_size", 4304), num_attention_heads=heads,
        patch_size=patch, position_grid_size=vc.get("pos_emb_height", 64),
        merge_kernel_size=int(merge[0]), rope_theta=float(rope.get("rope_theta", 10000.0)),
        projector_norm_epsilon=float(hf.get("projection_layer_norm_eps", 1e-5)),
        image_token_id=hf.get("image_token_id"), **overrides)


def hf_vision_config(v: VisionConfig) -> dict:
    """The ``vision_config`` section (and projector fields) of a Kimi-K2.5 ``config.json``."""
    return {
        "vision_config": {
            "model_type": "kimi_k25_vision", "patch_size": v.patch_size, "pos_emb_height": v.position_grid_size,
            "pos_emb_width": v.position_grid_size, "pos_emb_time": 4, "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_layers, "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
            "hidden_act": "gelu_pytorch_tanh", "merge_kernel_size": [v.merge_kernel_size, v.merge_kernel_size],
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "projection_hidden_size": v.hidden_size,
        "projection_layer_norm_eps": v.projector_norm_epsilon,
    }
