"""The vision tower's section of the model config (``model.vision``): a MoonViT-style encoder.

Names follow transformers' ``Kimi_K25VisionConfig`` where one exists (the HF side of the
converter maps them: ``megatron_kimi/convert/vision.py``). Kept out of ``megatron_kimi/config.py``
so that file stays one screen of sections; it is a plain dataclass with no imports of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class VisionConfig:
    """Encoder (pre-LayerNorm ViT, non-causal attention per image, 2D RoPE) + 2x2 merge + MLP projector."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 2
    patch_size: int = 14
    # Side of the learned square position grid, resampled bicubically to each image's patch grid.
    position_grid_size: int = 64
    merge_kernel_size: int = 2  # merge_kernel_size**2 patches become one LLM token
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5  # the tower's LayerNorms (HF hard-codes 1e-5)
    projector_norm_epsilon: float = 1e-5
    # The LLM token id of an image placeholder; None: the tokenizer's image token (data pipeline).
    image_token_id: Optional[int] = None
    # Which parts do NOT train (Kimi trains the tower alone first, then unfreezes the LM).
    freeze_tower: bool = False
    freeze_projector: bool = False
    freeze_lm: bool = False

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_size",
                     "position_grid_size", "merge_kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name} must be >= 1, got {getattr(self, name)}")
        head_dim, rem = divmod(self.hidden_size, self.num_attention_heads)
        if rem or head_dim % 4:
            # axial 2D RoPE: head_dim/4 frequencies per axis, each rotating a pair of dims
            raise ValueError(f"model.vision.hidden_size/num_attention_heads must be a multiple of 4, got "
                             f"{self.hidden_size}/{self.num_attention_heads}")
        if self.freeze_tower and self.freeze_projector and self.freeze_lm:
            raise ValueError("model.vision: freeze_tower, freeze_projector and freeze_lm all true leave nothing "
                             "to train")

    def layout_error(self, tensor: int) -> Optional[str]:
        """Why this tower cannot run at TP=tensor (None: it can). Any CP: the tower is not CP-split."""
        for name in ("num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) % tensor:
                return f"model.vision.{name}={getattr(self, name)} is not divisible by parallel.tensor={tensor}"
        return None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_size(self) -> int:
        """Width of one merged token before the projector (merge_kernel_size**2 patches)."""
        return self.hidden_size * self.merge_kernel_size**2
