"""Where each local parameter shard sits in the full model: Megatron's sharded_state_dict metadata.

Used for layout-independent init, for gathering full tensors (tests, HF export) and for
checking layouts against each other. A shard is identified by its checkpoint key (the same
with the TE and the local spec), its global layer index (the prepended axes), and the slice
of the unsharded tensor it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories


@dataclass
class Shard:
    key: str  # checkpoint key, e.g. "decoder.layers.self_attention.linear_qkv.weight"
    layer_index: Tuple[int, ...]  # global index along prepended (layer) axes; () if none
    full_shape: Tuple[int, ...]  # the unsharded tensor (without layer axes)
    index: Tuple[slice, ...]  # this shard's slice of it
    tensor: torch.Tensor  # the local data (a view of the parameter)
    replica_id: object

    @property
    def name(self) -> str:
        """Per-layer tensor name, e.g. "decoder.layers.3.self_attention.linear_qkv.weight"."""
        if not self.layer_index:
            return self.key
        prefix, _, rest = self.key.partition("layers.")
        return f"{prefix}layers.{'.'.join(map(str, self.layer_index))}.{rest}"


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _flatten(sharded_sd: dict) -> Iterator[ShardedTensor]:
    found, _ = extract_sharded_tensors_and_factories(sharded_sd)
    stack = list(found.values())
    while stack:
        item = stack.pop()
        if isinstance(item, ShardedTensorFactory):
            built = item.build()
            stack.extend(built.values() if isinstance(built, dict) else built if isinstance(built, (list, tuple)) else [built])
        elif isinstance(item, ShardedTensor):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def local_shards(chunks: List[torch.nn.Module]) -> List[Shard]:
    """Every tensor shard this rank holds (tied/duplicated views are listed once)."""
    out, seen = [], set()
    for chunk in chunks:
        for st in _flatten(unwrap(chunk).sharded_state_dict()):
            p = st.prepend_axis_num
            offsets = tuple(st.global_offset[p:])
            index = tuple(slice(o, o + n) for o, n in zip(offsets, st.data.shape))
            ident = (st.key, tuple(st.global_offset[:p]), offsets)
            if ident in seen:
                continue
            seen.add(ident)
            out.append(Shard(st.key, tuple(st.global_offset[:p]), tuple(st.global_shape[p:]), index, st.data, st.replica_id))
    return out


def assemble(shard_lists: List[List[Tuple[str, Tuple[int, ...], Tuple[slice, ...], torch.Tensor]]]) -> dict:
    """Rebuild full tensors {name: tensor} from (name, full_shape, index, data) records of all ranks."""
    full: dict = {}
    for records in shard_lists:
        for name, shape, index, data in records:
            t = full.setdefault(name, torch.full(shape, float("nan"), dtype=torch.float64))
            t[index] = data.double()
    return full
