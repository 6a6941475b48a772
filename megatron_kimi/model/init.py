"""Layout-independent weight initialisation.

Megatron initialises each rank's shard from that rank's RNG stream, so a model trained at TP=2 or
PP=2 starts from other weights than at TP=1. Here every parameter is drawn as the *full, unsharded*
tensor from a generator seeded by (seed, checkpoint key, global layer index), and each rank copies
its own slice. The slice comes from Megatron's ``sharded_state_dict`` (global shape and offsets of
every local shard, the same metadata ``dist_checkpointing`` uses), so the same model results at any
TP/PP/VPP layout, and with the TE or the local spec (their checkpoint keys agree).

Rules (Megatron's defaults): norms 1, biases 0, ``linear_proj``/``linear_fc2`` weights
N(0, std/sqrt(2·num_layers)), every other weight N(0, std).
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, List

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories


def _iter_sharded_tensors(sharded_sd: dict) -> Iterable[ShardedTensor]:
    tensors_and_factories, _ = extract_sharded_tensors_and_factories(sharded_sd)
    stack = list(tensors_and_factories.values()) if isinstance(tensors_and_factories, dict) else []
    while stack:
        item = stack.pop()
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            stack.extend(built if isinstance(built, (list, tuple)) else (built.values() if isinstance(built, dict) else [built]))
        elif isinstance(item, ShardedTensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if "norm" in key and ("weight" in leaf or leaf.endswith("_weight")):
        return "ones"
    if leaf.endswith("bias"):
        return "zeros"
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return "scaled_normal"
    return "normal"


def _seed(seed: int, key: str, layer_index: tuple) -> int:
    return zlib.crc32(f"{seed}|{key}|{layer_index}".encode()) & 0x7FFFFFFF


@torch.no_grad()
def init_weights(chunks: List[torch.nn.Module], seed: int, std: float, num_layers: int) -> int:
    """Initialise ``chunks`` (unwrapped GPTModels) in place; returns the number of shards set."""
    count = 0
    done = set()
    for chunk in chunks:
        for st in _iter_sharded_tensors(chunk.sharded_state_dict()):
            p = st.prepend_axis_num
            layer_index = tuple(st.global_offset[:p])
            ident = (st.key, layer_index, tuple(st.global_offset[p:]), st.data.data_ptr())
            if ident in done:
                continue
            done.add(ident)
            kind = _kind(st.key)
            local = st.data
            if kind == "ones":
                local.fill_(1.0)
            elif kind == "zeros":
                local.zero_()
            else:
                sigma = std / math.sqrt(2.0 * num_layers) if kind == "scaled_normal" else std
                full_shape = tuple(st.global_shape[p:])
                gen = torch.Generator(device=local.device).manual_seed(_seed(seed, st.key, layer_index))
                full = torch.randn(full_shape, generator=gen, dtype=torch.float32, device=local.device)
                index = tuple(
                    slice(off, off + n) for off, n in zip(st.global_offset[p:], local.shape)
                )
                local.copy_(full[index].mul_(sigma))
            count += 1
    return count
