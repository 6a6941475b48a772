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
from typing import List

import torch

from megatron_kimi.model.sharding import local_shards


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
    """Initialise ``chunks`` in place; returns the number of shards set."""
    shards = local_shards(chunks)
    for sh in shards:
        kind = _kind(sh.key)
        local = sh.tensor
        if kind == "ones":
            local.fill_(1.0)
        elif kind == "zeros":
            local.zero_()
        else:
            sigma = std / math.sqrt(2.0 * num_layers) if kind == "scaled_normal" else std
            gen = torch.Generator(device=local.device).manual_seed(_seed(seed, sh.key, sh.layer_index))
            full = torch.randn(sh.full_shape, generator=gen, dtype=torch.float32, device=local.device)
            local.copy_(full[sh.index].mul_(sigma))
    return len(shards)
