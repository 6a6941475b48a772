"""MoonViT-style vision tower on Megatron-Core: native-resolution patches, one attention segment per image.

Matches transformers' ``Kimi_K25VisionModel`` (models/kimi_k25) in fp32:

* a 14x14-pixel ``Conv2d`` patch embedding (``pixel_values [N, 3, 14, 14]``: the patches of every image
  of the micro-batch, each image's in raster order; ``grid_thw [n, 3]`` = (1, h, w) per image);
* a learned square position grid resampled bicubically (``align_corners=False``) to each image's
  (h, w) and added to the patch embeddings;
* pre-LayerNorm ViT layers (Megatron ``TransformerBlock``, local spec, biases, tanh-GELU MLP) whose
  attention is non-causal within an image and never across images: the images are THD segments of
  one packed sequence (``PackedSeqParams``), run through the project's packed-attention dispatch;
* axial 2D RoPE over the whole head dim: ``head_dim/4`` frequencies, angles interleaved
  (w0, h0, w1, h1, ...) and repeated for the two halves, handed to Megatron as one angle row per
  token (its THD RoPE takes a per-token table when its length is the packed length);
* a final LayerNorm, then each 2x2 window of patches grouped into one merged row ``[M, 4, D]``.

The position resampling is a pair of dense matrices per image (``A_h [h, G] @ grid [G, G, D] @ A_w^T``)
rather than HF's ``embedding_bag`` gather: the same numbers, and its backward is two matmuls, so the
grid's gradient is bit-reproducible on GPUs (an ``embedding_bag``/``index_add`` backward accumulates
with atomics).

Parallelism: tensor-parallel inside the block (column/row-parallel linears); the patch embedding, the
grid and the norms are replicated (their inputs are the same on every TP rank, so are their grads). The
tower has no sequence or context parallelism (images are short next to the text: under CP every CP rank
runs the whole tower and keeps the features of its own placeholder positions, see parallel/context.py)
and lives on the first pipeline stage only (``megatron_kimi/model/vision/vlm.py``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_kimi.model.attention import SDPACoreAttention
from megatron_kimi.model.norm import LayerNorm
from megatron_kimi.model.vision.config import VisionConfig


def vision_transformer_config(vision: VisionConfig, lm_config: TransformerConfig) -> TransformerConfig:
    """The tower's Megatron config: the LM's precision and TP size, its own shape, no PP/CP/SP."""
    return dataclasses.replace(
        lm_config,
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.ffn_hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,
        kv_channels=vision.head_dim,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=partial(F.gelu, approximate="tanh"),  # HF "gelu_pytorch_tanh"
        normalization="LayerNorm",
        layernorm_epsilon=vision.norm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        sequence_parallel=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        calculate_per_token_loss=False,
    )


def vision_layer_spec(attention_impl: str = "auto") -> ModuleSpec:
    """Megatron's local layer with LayerNorms and non-causal packed core attention."""
    spec = get_gpt_layer_local_spec(normalization="LayerNorm")
    sub = spec.submodules
    sub.input_layernorm = LayerNorm
    sub.pre_mlp_layernorm = LayerNorm
    sub.self_attention.params = {**sub.self_attention.params, "attn_mask_type": AttnMaskType.no_mask}
    sub.self_attention.submodules.core_attention = ModuleSpec(module=SDPACoreAttention,
                                                              params={"impl": attention_impl})
    return spec


def image_bounds(grid_thw: torch.Tensor, merge: int) -> list[Tuple[int, int]]:
    """(h, w) per image from ``grid_thw [n, 3]``, checked: images only (t == 1), sides a multiple of the merge."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_images, 3], got {tuple(grid_thw.shape)}")
    out = []
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"image {i}: grid_thw t={t}; the tower takes images (t=1), not video")
        if h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"image {i}: patch grid {h}x{w} is not a positive multiple of the {merge}x{merge} "
                             f"merge (the image processor pads images to a multiple of {merge} patches)")
        out.append((int(h), int(w)))
    return out


def axial_rope_angles(hw: list[Tuple[int, int]], head_dim: int, theta: float, device) -> torch.Tensor:
    """Per-patch RoPE angles ``[N, 1, 1, head_dim]`` for images of patch grids ``hw`` (raster order)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=device)
                                / (head_dim // 2)))
    rows, cols = [], []
    for h, w in hw:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    row_N, col_N = torch.cat(rows).float(), torch.cat(cols).float()
    # (w·f0, h·f0, w·f1, h·f1, ...): the pair order of HF's recomposition
    wh_NF2 = torch.stack([col_N[:, None] * inv_freq, row_N[:, None] * inv_freq], dim=-1)
    half_NF = wh_NF2.flatten(1)
    return torch.cat([half_NF, half_NF], dim=-1)[:, None, None, :]


def merge_index(hw: list[Tuple[int, int]], merge: int, device) -> torch.Tensor:
    """``[M, merge**2]`` rows of the patch sequence that form each merged token (window-major per image)."""
    parts, offset = [], 0
    for h, w in hw:
        base = torch.arange(offset, offset + h * w, device=device).view(h // merge, merge, w // merge, merge)
        parts.append(base.permute(0, 2, 1, 3).reshape(-1, merge * merge))
        offset += h * w
    return torch.cat(parts)


class VisionTower(MegatronModule):
    """``pixel_values [N, 3, P, P]`` + ``grid_thw [n, 3]`` -> merged patch features ``[M, merge**2, D]``."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, attention_impl: str = "auto",
                 own_group=None):
        """``own_group``: a process group of this rank alone, needed under context parallelism (the
        tower is not CP-split, but Megatron's THD RoPE divides by the size of the CP group it is given)."""
        super().__init__(config=config)
        self.vision = vision
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        device = torch.cuda.current_device() if on_gpu else "cpu"
        D, P, G = vision.hidden_size, vision.patch_size, vision.position_grid_size
        self.patch_embed = torch.nn.Conv2d(3, D, kernel_size=P, stride=P, device=device, dtype=config.params_dtype)
        self.position_embedding = torch.nn.Parameter(torch.zeros(G, G, D, device=device, dtype=config.params_dtype))
        pgs = ProcessGroupCollection.use_mpu_process_groups()
        if pgs.cp is not None and pgs.cp.size() > 1:
            assert own_group is not None and own_group.size() == 1, "the tower under CP needs a one-rank group"
            pgs.cp = own_group
        self.decoder = TransformerBlock(
            pg_collection=pgs,
            config=config,
            spec=TransformerBlockSubmodules(layer_specs=[vision_layer_spec(attention_impl)] * vision.num_layers,
                                            layer_norm=LayerNorm),
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
        )
        # Resampling matrices per output length (not state: rebuilt from the grid size on demand).
        self._resample: Dict[Tuple[int, str], torch.Tensor] = {}

    def _resample_matrix(self, n: int, device) -> torch.Tensor:
        """``[n, G]``: bicubic (align_corners=False) resampling of a length-G axis to length n.

        Bicubic interpolation is separable, and resizing the identity image ``I_G`` to ``(n, G)`` leaves
        the second axis untouched (scale 1 hits the centre tap exactly): the result is the matrix itself.
        """
        key = (n, str(device))
        if key not in self._resample:
            G = self.vision.position_grid_size
            # A plain tensor even when first built under the rollout engine's inference mode: training
            # reuses it, and autograd cannot save inference tensors.
            with torch.inference_mode(False), torch.no_grad():
                eye = torch.eye(G, dtype=torch.float32, device=device)[None, None]
                self._resample[key] = F.interpolate(eye, size=(n, G), mode="bicubic", align_corners=False)[0, 0]
        return self._resample[key]

    def position_embeddings(self, hw: list[Tuple[int, int]]) -> torch.Tensor:
        """The learned grid resampled to each image's (h, w): ``[N, D]`` in patch order."""
        grid_GGD = self.position_embedding
        parts = []
        for h, w in hw:
            A_hG = self._resample_matrix(h, grid_GGD.device).to(grid_GGD.dtype)
            A_wG = self._resample_matrix(w, grid_GGD.device).to(grid_GGD.dtype)
            parts.append(torch.einsum("hi,ijd,wj->hwd", A_hG, grid_GGD, A_wG).reshape(h * w, -1))
        return torch.cat(parts)

    def forward(self, pixel_values_N3PP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merge = self.vision.merge_kernel_size
        hw = image_bounds(grid_thw, merge)
        N = sum(h * w for h, w in hw)
        if pixel_values_N3PP.shape[0] != N:
            raise ValueError(f"pixel_values has {pixel_values_N3PP.shape[0]} patches but grid_thw describes {N}")
        weight = self.patch_embed.weight
        x_ND = self.patch_embed(pixel_values_N3PP.to(device=weight.device, dtype=weight.dtype)).view(N, -1)
        x_ND = x_ND + self.position_embeddings(hw)
        lengths = torch.tensor([h * w for h, w in hw], dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)]).to(weight.device)
        longest = int(lengths.max())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        rope = axial_rope_angles(hw, self.vision.head_dim, self.vision.rope_theta, weight.device)
        y_N1D = self.decoder(hidden_states=x_ND.unsqueeze(1), attention_mask=None, rotary_pos_emb=rope,
                             packed_seq_params=packed)
        return y_N1D.squeeze(1)[merge_index(hw, merge, weight.device)]  # [M, merge**2, D]


class VisionProjector(MegatronModule):
    """Merged features ``[M, merge**2, D]`` -> LLM embeddings ``[M, H]``: LayerNorm per patch, then
    Linear(4D, 4D) - GELU - Linear(4D, H) as Megatron's ``MultimodalProjector`` (column/row-parallel)."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig):
        super().__init__(config=config)
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules

        self.pre_norm = LayerNorm(config, vision.hidden_size, eps=vision.projector_norm_epsilon)
        self.projector = MultimodalProjector(
            config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            projector_type="mlp", input_size=vision.merged_size)

    def forward(self, merged_MKD: torch.Tensor) -> torch.Tensor:
        x_MKD = self.pre_norm(merged_MKD)
        return self.projector(x_MKD.reshape(x_MKD.shape[0], -1))


def projector_transformer_config(vision: VisionConfig, lm_config: TransformerConfig) -> TransformerConfig:
    """The projector MLP's config: in/ffn width merge**2·D, out the LLM's hidden size, exact GELU."""
    return dataclasses.replace(
        vision_transformer_config(vision, lm_config),
        num_layers=1,
        hidden_size=lm_config.hidden_size,
        ffn_hidden_size=vision.merged_size,
        num_attention_heads=lm_config.num_attention_heads,
        num_query_groups=lm_config.num_attention_heads,
        kv_channels=lm_config.kv_channels,
        activation_func=F.gelu,  # HF nn.GELU(): the erf form
    )
