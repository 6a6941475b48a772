"""Build the Llama/Qwen2-style decoder as Megatron-Core ``GPTModel`` chunks.

The model is written once, single-device style, as a layer spec; parallelism comes from Megatron's
parallel state (TP/PP/VPP/SP/CP) and from :func:`wrap_for_training` (precision + DDP).

Spec choice: Transformer Engine layers when TE is importable *and* CUDA is present (or when asked
for explicitly), else Megatron's local layers with our sequence-parallel RMSNorm and SDPA attention.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_kimi.config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_kimi.model.flops import padded_vocab_size  # noqa: F401 (re-exported)
from megatron_kimi.model.attention import SDPACoreAttention
from megatron_kimi.model.gpt import KimiGPTModel
from megatron_kimi.model.norm import RMSNorm
from megatron_kimi.model.vision.vlm import KimiVLModel, apply_freezing  # noqa: F401 (apply_freezing re-exported)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise ValueError("model.transformer_impl=transformer_engine but transformer_engine is not importable")
        return True
    if model.transformer_impl == "local":
        return False
    return have_transformer_engine() and torch.cuda.is_available()


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    recompute: Optional[RecomputeConfig] = None,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for our config tree."""
    recompute = recompute or RecomputeConfig()
    dtype = _DTYPES[precision.dtype]
    kv = model.kv_channels or model.hidden_size // model.num_attention_heads
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=kv,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        # Weights are then overwritten by megatron_kimi.model.init (layout-independent). Megatron's
        # own init must still run: in 0.16 it is what sets the tensor-parallel attributes of the
        # linear weights; without them the grad norm skips TP shards (see megatron_fixes/README).
        perform_initialization=True,
        use_cpu_initialization=on_cpu,
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=True,
        # gloo: batched isend/irecv between the same two ranks in both directions (PP=2 with virtual
        # stages) pair messages by posting order and swap activations with grads; Megatron's
        # unbatched path keeps the two directions on separate groups (see megatron_fixes/README).
        batch_p2p_comm=not on_cpu,
        recompute_granularity=recompute.granularity,
    )
    if recompute.granularity == "full":
        kwargs.update(recompute_method=recompute.method, recompute_num_layers=recompute.num_layers)
    return TransformerConfig(**kwargs)


def local_layer_spec(attention_impl: str = "auto") -> ModuleSpec:
    """Megatron's local GPT layer with our SP-capable RMSNorm and SDPA / packed core attention."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.submodules.core_attention = ModuleSpec(module=SDPACoreAttention,
                                                              params={"impl": attention_impl})
    return spec


def block_spec(config: TransformerConfig, te: bool, vp_stage: Optional[int],
               attention_impl: str = "auto") -> TransformerBlockSubmodules:
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage)
    n_local = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer = local_layer_spec(attention_impl)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_local, layer_norm=RMSNorm)


def layer_offset(config: TransformerConfig, vp_stage: Optional[int]) -> int:
    return get_transformer_layer_offset(config, vp_stage=vp_stage)


def build_model_chunks(model: ModelConfig, config: TransformerConfig, vocab_size: int,
                       lm_head_impl: str = "megatron") -> List[GPTModel]:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (one without VPP).

    ``lm_head_impl="fused"``: the per-token loss (forward with labels) comes from the fused
    vocab-parallel log-prob kernel instead of logits + Megatron's cross-entropy (model/gpt.py).
    """
    te = use_transformer_engine(model)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    own_group = None
    if model.vision is not None and config.context_parallel_size > 1:
        # collective (every rank builds its chunks): one single-rank group per rank, for the tower
        import torch.distributed as dist

        own_group, _ = dist.new_subgroups(group_size=1)
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        # With model.vision: the VLM, whose first-stage chunk also holds the tower and projector.
        cls, extra = ((KimiVLModel, {"vision": model.vision, "attention_impl": model.attention_impl,
                                     "own_group": own_group})
                      if model.vision is not None else (KimiGPTModel, {}))
        chunk = cls(
            config=config,
            transformer_layer_spec=block_spec(config, te, stage, model.attention_impl),
            vocab_size=vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            rotary_base=int(model.rotary_base) if float(model.rotary_base).is_integer() else model.rotary_base,
            vp_stage=stage,
            lm_head_impl=lm_head_impl,
            **extra,
        )
        chunk.model_type = getattr(chunk, "model_type", None)
        chunks.append(chunk)
    return chunks


def wrap_for_training(
    chunks: List[torch.nn.Module],
    config: TransformerConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
) -> List[DistributedDataParallel]:
    """Float16Module (bf16/fp16) then Megatron DDP (grad buffers, distributed-optimizer sharding)."""
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    return wrapped
