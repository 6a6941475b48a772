"""Hugging Face Kimi-K2.5 (``Kimi_K25ForConditionalGeneration``) <-> our VLM (``model.vision``). Pure functions.

A Kimi-K2.5 directory (``config.json`` ``model_type: kimi_k25``) holds a vision tower + projector
(:mod:`megatron_kimi.convert.vision`) and a Llama or Qwen2 *base* text model under
``model.language_model.`` (its ``lm_head.weight`` stays top level):

==================================================  ===============================================
Megatron (checkpoint keys)                          Hugging Face Kimi-K2.5 (transformers' names)
==================================================  ===============================================
embedding.* / decoder.* / output_layer.*            the Llama / Qwen2 table of ``convert/hf.py`` with
                                                    ``model.`` -> ``model.language_model.``
                                                    (``lm_head.weight`` unchanged; absent when tied)
vision_model.* (first pipeline stage)               model.vision_tower.* (table in ``convert/vision.py``)
vision_projection.* (first pipeline stage)          model.mm_projector.*
==================================================  ===============================================

``config.json``: ``text_config`` (model_type llama / qwen2: the ``ModelConfig`` LM fields),
``vision_config`` + ``projection_hidden_size`` / ``projection_layer_norm_eps`` / ``image_token_id``
(``model.vision``). Word-embedding tying is the *top-level* ``tie_word_embeddings`` (default true), as in
transformers (``text_config.tie_word_embeddings`` is not read there: the text model has no LM head).

The names are transformers' in-memory ones, which ``save_pretrained(..., save_original_format=False)``
writes and ``from_pretrained`` loads. ``save_pretrained``'s default (``save_original_format=True``)
writes Moonshot's original layout instead (``language_model.model.*``, ``vision_tower.encoder.blocks.*``
with a fused, RoPE-permuted ``wqkv``, ``mm_projector.proj.{0,2}``); that layout is refused with a
message (transformers 5.19 also fuses a Llama / Qwen2 text model's q/k/v there and cannot load it back).
Video-only fields (``pos_emb_time``, ``video_token_id``) are carried over, not used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_kimi.config import ModelConfig
from megatron_kimi.convert import hf, vision
from megatron_kimi.model.vision.config import VisionConfig

MODEL_TYPE = "kimi_k25"
ARCHITECTURE = "Kimi_K25ForConditionalGeneration"
TEXT_PREFIX = "model.language_model."
DEFAULT_IMAGE_TOKEN_ID = 163605  # transformers' Kimi_K25Config default
_ORIGINAL_PREFIXES = ("language_model.", "vision_tower.", "mm_projector.")
# Top-level config.json fields this module writes (the rest of an original config is kept).
_TOP_FIELDS = ("architectures", "model_type", "text_config", "vision_config", "projection_hidden_size",
               "projection_layer_norm_eps", "image_token_id", "tie_word_embeddings", "dtype", "torch_dtype",
               "transformers_version")


def is_kimi_k25(hf_config: dict) -> bool:
    return isinstance(hf_config, dict) and hf_config.get("model_type") == MODEL_TYPE


# --------------------------------------------------------------------------------------------
# Architecture: the LM's hf.Arch + the tower's VisionConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLMArch:
    text: hf.Arch
    vision: VisionConfig

    # what the converters read off an hf.Arch
    num_layers = property(lambda self: self.text.num_layers)
    padded_vocab_size = property(lambda self: self.text.padded_vocab_size)
    vocab_size = property(lambda self: self.text.vocab_size)
    tied = property(lambda self: self.text.tied)


def arch_from_model_config(m: ModelConfig, padded_vocab_size: int, vocab_size: Optional[int] = None):
    """``hf.Arch`` for a plain LM, ``VLMArch`` when ``m.vision`` is set."""
    text = hf.arch_from_model_config(m, padded_vocab_size, vocab_size)
    return text if m.vision is None else VLMArch(text, m.vision)


def mapping(a):
    """The module whose functions map ``a`` (``hf`` for an ``hf.Arch``, this one for a ``VLMArch``):
    ``megatron_segments``, ``megatron_shapes``, ``megatron_names``, ``hf_shapes``, ``hf_from_megatron``,
    ``is_ignorable_hf_tensor``, all ``(..., a)``."""
    import sys

    return sys.modules[__name__] if isinstance(a, VLMArch) else hf


def stack_depth(key: str, a) -> int:
    """Length of the layer axis of stacked checkpoint key ``key``."""
    if isinstance(a, VLMArch) and vision.is_vision_name(key):
        return a.vision.num_layers
    return a.num_layers


def to_hf_name(lm_name: str) -> str:
    """A Llama / Qwen2 HF name -> its Kimi-K2.5 name (``model.x`` -> ``model.language_model.x``)."""
    return TEXT_PREFIX + lm_name[len("model."):] if lm_name.startswith("model.") else lm_name


def from_hf_name(name: str) -> str:
    """Inverse of :func:`to_hf_name`."""
    return "model." + name[len(TEXT_PREFIX):] if name.startswith(TEXT_PREFIX) else name


def megatron_segments(name: str, a: VLMArch) -> List[hf.Segment]:
    if vision.is_vision_name(name):
        return vision.vision_segments(name, a.vision, a.text.hidden_size)
    return [hf.Segment(None if s.hf_name is None else to_hf_name(s.hf_name), s.start, s.stop)
            for s in hf.megatron_segments(name, a.text)]


def megatron_shapes(a: VLMArch) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    return {**vision.megatron_vision_shapes(a.vision, a.text.hidden_size), **hf.megatron_shapes(a.text)}


def megatron_names(a: VLMArch) -> List[str]:
    return vision.megatron_vision_names(a.vision) + hf.megatron_names(a.text)


def hf_shapes(a: VLMArch) -> Dict[str, Tuple[int, ...]]:
    out = dict(vision.hf_vision_shapes(a.vision, a.text.hidden_size))
    out.update({to_hf_name(k): shape for k, shape in hf.hf_shapes(a.text).items()})
    return out


def is_ignorable_hf_tensor(name: str, a: VLMArch) -> bool:
    return not vision.is_hf_vision_name(name) and hf.is_ignorable_hf_tensor(from_hf_name(name), a.text)


def megatron_from_hf(name: str, get: Callable[[str], torch.Tensor], a: VLMArch) -> torch.Tensor:
    return hf.assemble_segments(megatron_segments(name, a), get)


def hf_from_megatron(name: str, tensor: torch.Tensor, a: VLMArch) -> Dict[str, torch.Tensor]:
    return hf.split_segments(name, megatron_segments(name, a), tensor)


def check_tensor_layout(names, where: str) -> None:
    """Refuse Moonshot's original layout (``save_pretrained``'s default) with a way out."""
    original = sorted(n for n in names if n.startswith(_ORIGINAL_PREFIXES))
    if original:
        raise hf.ConversionError(
            f"tensor {original[0]!r} in {where}: this is the original Kimi-K2.5 layout (what transformers' "
            "save_pretrained writes by default); only transformers' own names (model.language_model.*, "
            "model.vision_tower.*, model.mm_projector.*, lm_head.weight) are read: load it with "
            "Kimi_K25ForConditionalGeneration.from_pretrained and re-save with "
            "save_pretrained(..., save_original_format=False)")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def text_config_of(hf_config: Optional[dict]) -> dict:
    """The LM part of an HF config: ``text_config`` (with the top-level tying) for Kimi-K2.5, else itself."""
    if not is_kimi_k25(hf_config or {}):
        return hf_config or {}
    tied = bool(hf_config.get("tie_word_embeddings", True))  # Kimi_K25Config's default
    return dict(hf_config.get("text_config") or {}, tie_word_embeddings=tied)


def text_model_type(hf_config: dict) -> str:
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        raise hf.ConversionError(f"unsupported Hugging Face config: text_config={text!r} (a Llama or Qwen2 "
                                 "text_config section is required; transformers' default is deepseek_v3)")
    kind = text.get("model_type", "deepseek_v3")
    if kind not in hf.SUPPORTED_ARCHITECTURES:
        raise hf.ConversionError(f"unsupported Hugging Face config: text_config.model_type={kind!r} (kimi_k25: "
                                 f"only {' / '.join(hf.SUPPORTED_ARCHITECTURES)} text models are supported)")
    return kind


def model_config_from_hf(hf_config: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Kimi-K2.5 config.json -> ModelConfig with ``vision``; unsupported fields raise naming the field."""
    text_model_type(hf_config)
    try:
        m = hf.model_config_from_hf(text_config_of(hf_config), make_vocab_size_divisible_by)
    except hf.ConversionError as e:
        raise hf.ConversionError(f"text_config: {e}") from None
    token = hf_config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise hf.ConversionError(f"unsupported Hugging Face config: image_token_id={token!r} (a token id is "
                                 "required)")
    try:
        v = vision.vision_config_from_hf(dict(hf_config, image_token_id=token), m.hidden_size)
    except ValueError as e:  # the checks of vision_config_from_hf / VisionConfig name the field
        raise hf.ConversionError(f"unsupported Hugging Face config: {e}") from None
    return replace(m, vision=v)


def hf_config_from_model_config(m: ModelConfig, text_type: str, vocab_size: int, dtype: torch.dtype,
                                base: Optional[dict] = None) -> dict:
    """ModelConfig with ``vision`` -> Kimi-K2.5 config.json (``base``: the original config, or token ids)."""
    v = m.vision
    base = base or {}
    original = is_kimi_k25(base)
    text_base = dict(base.get("text_config") or {}) if original else dict(base)
    text = hf.hf_config_from_model_config(m, text_type, vocab_size, dtype, base=text_base)
    if "architectures" not in text_base:
        text.pop("architectures")  # the text model is a base model (no head) inside the VLM
    # transformers ties by the top-level flag; keep the sub-config's own value when there was one
    text["tie_word_embeddings"] = text_base.get("tie_word_embeddings", m.tie_word_embeddings)
    token = v.image_token_id if v.image_token_id is not None else base.get("image_token_id")
    if token is None:
        raise hf.ConversionError("model.vision.image_token_id is not set (and no original config.json records "
                                 "image_token_id): set it to the tokenizer's image placeholder id")
    out = {k: val for k, val in base.items() if k not in _TOP_FIELDS} if original else {}
    ours = vision.hf_vision_config(v)
    vision_config = {**((base.get("vision_config") or {}) if original else {}), **ours["vision_config"]}
    if original and "pos_emb_time" in (base.get("vision_config") or {}):  # video only: not modelled, kept
        vision_config["pos_emb_time"] = base["vision_config"]["pos_emb_time"]
    out.update(ours, architectures=[ARCHITECTURE], model_type=MODEL_TYPE, text_config=text,
               vision_config=vision_config, image_token_id=token, tie_word_embeddings=m.tie_word_embeddings,
               dtype=text["dtype"])
    return out
