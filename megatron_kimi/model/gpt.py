"""``GPTModel`` whose language-model loss can come from the fused vocab-parallel log-prob kernel.

With labels, Megatron's ``_postprocess`` materialises the ``[s, b, V/tp]`` logits (plus, in its
cross-entropy, an fp32 copy, the softmax and their gradient) to return the per-token CE ``[b, s]``.
With ``lm_head_impl="fused"`` the same ``[b, s]`` fp32 CE is ``−log π(label)`` from
:func:`megatron_kimi.kernels.fused_logprob.token_logprob_entropy`, which streams over the vocab
shard in chunks and never holds more than a ``[chunk, V/tp]`` block. Everything else (no labels:
logits for generation; multi-token prediction; inference) takes Megatron's path.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_kimi.kernels.fused_logprob import token_logprob_entropy

LM_HEAD_IMPLS = ("fused", "megatron")


class KimiGPTModel(GPTModel):
    def __init__(self, *args, lm_head_impl: str = "megatron", **kwargs):
        if lm_head_impl not in LM_HEAD_IMPLS:
            raise ValueError(f"lm_head_impl must be one of {LM_HEAD_IMPLS}, got {lm_head_impl!r}")
        super().__init__(*args, **kwargs)
        self.lm_head_impl = lm_head_impl

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        inference = kwargs.get("inference_context") is not None and not self.training
        if (labels is None or not self.post_process or self.lm_head_impl != "fused" or inference
                or kwargs.get("mtp_in_postprocess") or self.config.mtp_num_layers is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        return -self.token_logprobs(hidden_states, labels)

    def token_logprobs(self, hidden_SBH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """fp32 ``log π(labels)`` ``[b, s]`` from the final-norm output ``[s(/tp under SP), b, h]``."""
        tp_group = self.pg_collection.tp
        if self.output_layer.sequence_parallel:
            # The kernel all-reduces grad_hidden itself, so the gather's backward must be a plain split
            # (Megatron's output layer uses a reduce-scatter there: that would sum twice).
            hidden_SBH = gather_from_sequence_parallel_region(hidden_SBH, tensor_parallel_output_grad=False,
                                                              group=tp_group)
        weight_VH = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                     else self.output_layer.weight)
        S, B, H = hidden_SBH.shape
        tp_size = tp_group.size() if tp_group is not None else 1
        vocab_start = (tp_group.rank() if tp_size > 1 else 0) * weight_VH.shape[0]
        labels_T = labels_BS.transpose(0, 1).reshape(S * B)
        # CPU: the chunked PyTorch path (never the Triton interpreter, far too slow for a training step).
        logp_T, _ = token_logprob_entropy(hidden_SBH.reshape(S * B, H), weight_VH, labels_T,
                                          tp_group=tp_group if tp_size > 1 else None, vocab_start=vocab_start,
                                          backend="auto" if hidden_SBH.is_cuda else "torch")
        return logp_T.view(S, B).transpose(0, 1).contiguous()
