"""The vision-language model: the LM (``KimiGPTModel``) with the tower and projector on its first stage.

Image features enter where the text has image placeholder tokens: the projected features replace
those tokens' word embeddings, in order, before the embeddings are split for sequence parallelism.
The micro-batch was split for context parallelism upstream, which is why a per-token index into the
features, not the placeholder count, decides which feature goes where (:class:`ImageInputs`; every CP
rank runs the whole tower). Everything after the embedding is the LM's own code path, so TP/PP/SP, the
fused LM head and the checkpoint keys of the LM are unchanged; the tower adds ``vision_model.*`` and
``vision_projection.*`` keys on the first pipeline stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from megatron.core import tensor_parallel

from megatron_kimi.model.gpt import KimiGPTModel
from megatron_kimi.model.vision.config import VisionConfig
from megatron_kimi.model.vision.tower import (
    VisionProjector,
    VisionTower,
    projector_transformer_config,
    vision_transformer_config,
)


@dataclass
class ImageInputs:
    """The images of one micro-batch.

    ``token_index_BS``: for every text position, the row of the merged image features it takes, or -1
    for text. None: derived from the placeholder tokens (``image_token_id``) of ``input_ids``, which
    needs the whole sequence (no context parallelism).
    """

    pixel_values_N3PP: torch.Tensor
    grid_thw: torch.Tensor  # [n, 3] int64 (1, h, w) in patches
    token_index_BS: Optional[torch.Tensor] = None

    def to(self, device) -> "ImageInputs":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ImageInputs(**{k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in moved.items()})


def placeholder_index(input_ids_BS: torch.Tensor, image_token_id: int, num_features: int) -> torch.Tensor:
    """``token_index_BS`` from placeholder tokens: the k-th placeholder (batch-major) takes feature row k."""
    mask_BS = input_ids_BS == image_token_id
    count = int(mask_BS.sum())
    if count != num_features:
        raise ValueError(f"the text has {count} image placeholder tokens (id {image_token_id}) but the images "
                         f"give {num_features} merged features: each image of patch grid h x w needs "
                         f"h*w/merge**2 placeholders")
    index_BS = torch.cumsum(mask_BS.flatten().long(), 0).view_as(mask_BS) - 1
    return torch.where(mask_BS, index_BS, torch.full_like(index_BS, -1))


def splice_features(embeds_BSH: torch.Tensor, features_MH: torch.Tensor, token_index_BS: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the positions ``token_index >= 0`` replaced by those feature rows (a gradient
    flows to the features, none to the replaced embeddings). Indexing only the image positions keeps
    the backward an index_put over distinct rows: deterministic."""
    mask_BS = token_index_BS >= 0
    out = embeds_BSH.clone()
    out[mask_BS] = features_MH[token_index_BS[mask_BS]].to(out.dtype)
    return out


class KimiVLModel(KimiGPTModel):
    """``KimiGPTModel`` whose ``forward`` also takes ``images=ImageInputs`` (first pipeline stage)."""

    def __init__(self, *args, vision: VisionConfig, attention_impl: str = "auto", own_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision = vision
        if self.pre_process:
            self.vision_model = VisionTower(vision_transformer_config(vision, self.config), vision, attention_impl,
                                            own_group)
            self.vision_projection = VisionProjector(projector_transformer_config(vision, self.config), vision)

    def image_features(self, images: ImageInputs) -> torch.Tensor:
        """Projected features ``[M, H]`` of the micro-batch's images, in placeholder order."""
        return self.vision_projection(self.vision_model(images.pixel_values_N3PP, images.grid_thw))

    def embed(self, input_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor, images: ImageInputs) -> torch.Tensor:
        """Word embeddings with image features spliced in (plus learned absolute positions, if any) ->
        ``[s(/tp under SP), b, h]``, as ``LanguageModelEmbedding.forward`` returns them."""
        features_MH = self.image_features(images)
        index_BS = images.token_index_BS
        if index_BS is None:
            if self.vision.image_token_id is None:
                raise ValueError("images without token_index_BS need model.vision.image_token_id")
            index_BS = placeholder_index(input_ids_BS, self.vision.image_token_id, features_MH.shape[0])
        index_BS = index_BS.to(input_ids_BS.device)
        # Placeholder ids may lie outside the vocab (HF's image token id does): embed them as 0, then replace.
        ids_BS = torch.where(index_BS >= 0, torch.zeros_like(input_ids_BS), input_ids_BS)
        emb = self.embedding
        assert emb.tokentype_embeddings is None
        # Under SP Megatron's word embedding reduce-scatters its output straight into sequence shards:
        # here the whole [b, s, h] (all-reduced) is needed first, to splice; the scatter follows below.
        words = emb.word_embeddings
        fused, words.reduce_scatter_embeddings = words.reduce_scatter_embeddings, False
        try:
            x_BSH = splice_features(words(ids_BS), features_MH, index_BS)
        finally:
            words.reduce_scatter_embeddings = fused
        if emb.add_position_embedding:
            x_BSH = x_BSH + emb.position_embeddings(position_ids_BS)
        x_SBH = x_BSH.transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:
            x_SBH = x_SBH.float()
        if self.config.sequence_parallel:
            if emb.scatter_to_sequence_parallel:
                x_SBH = tensor_parallel.scatter_to_sequence_parallel_region(x_SBH, group=emb.tp_group)
            if self.config.clone_scatter_output_in_embedding:
                x_SBH = x_SBH.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return emb.embedding_dropout(x_SBH)
        return emb.embedding_dropout(x_SBH)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args,
                images: Optional[ImageInputs] = None, **kwargs):
        if images is not None and self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, position_ids, images)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)


def part_of(name: str) -> str:
    """Which part a parameter name belongs to: ``tower``, ``projector`` or ``lm``."""
    if name.startswith("vision_model."):
        return "tower"
    if name.startswith("vision_projection."):
        return "projector"
    return "lm"


def apply_freezing(chunks: Iterable[torch.nn.Module], vision: VisionConfig) -> None:
    """``requires_grad=False`` on the frozen parts (before DDP wrapping: Megatron's DDP gives grad
    buffers, and its optimizer param groups, only to parameters that require grad)."""
    frozen = {"tower": vision.freeze_tower, "projector": vision.freeze_projector, "lm": vision.freeze_lm}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if frozen[part_of(name)]:
                p.requires_grad_(False)
