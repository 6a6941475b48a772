"""Global batches of packed SFT sequences (THD) for the trainer, addressed by packs consumed.

Epoch e of a stage is the pack plan ``plan_epoch(lengths, seq_length, seed, e)`` (best-fit-decreasing,
reshuffled per epoch); a step takes the next ``packs_per_step`` packs, DP rank r the r-th contiguous
slice, one pack per micro-batch (Megatron's THD format has batch size 1). Packs left over at the end
of an epoch (fewer than a global batch) are dropped and counted. The position is a single number
(packs consumed in the stage), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_kimi.data.packing import build_pack, plan_epoch


def to_thd_batch(pack: dict) -> Dict[str, object]:
    """A packed sample -> the trainer's micro-batch (tokens/labels/... [1, T] + PackedSeqParams)."""
    cu = torch.as_tensor(pack["cu_seqlens"], dtype=torch.int32)
    cu_pad = torch.as_tensor(pack["cu_seqlens_padded"], dtype=torch.int32)
    max_len = int((cu_pad[1:] - cu_pad[:-1]).max())
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return {
        "tokens": torch.as_tensor(pack["tokens"]).long(),
        "labels": torch.as_tensor(pack["labels"]).long(),
        "loss_mask": torch.as_tensor(pack["loss_mask"]).float(),
        "position_ids": torch.as_tensor(pack["position_ids"]).long(),
        "packed_seq_params": params,
    }


def check_not_overlong(cache, seq_length: int) -> None:
    """``ValueError`` naming the jsonl file and line of the first sample longer than ``seq_length``."""
    over = np.flatnonzero(cache.lengths > seq_length)
    if len(over):
        i = int(over[0])
        raise ValueError(
            f"{cache.source}:{int(cache.source_lines[i])}: sample of {int(cache.lengths[i])} tokens is longer "
            f"than seq_length={seq_length} ({len(over)} such sample(s); data.overlong=error; set it to "
            "'truncate' or 'drop' to cut or leave them out, counted)")


class PackedSFTSource:
    def __init__(self, cache, seq_length: int, packs_per_step: int, dp_rank: int, dp_size: int, seed: int,
                 pad_id: int, overlong: str = "truncate", pad_to_multiple: int = 1):
        self.cache = cache
        self.seq_length = seq_length
        self.global_batch_size = packs_per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.pad_id = seed, pad_id
        self.overlong, self.pad_to_multiple = overlong, pad_to_multiple
        self._plans: dict = {}
        if overlong == "error":
            check_not_overlong(cache, seq_length)

    def plan(self, epoch: int):
        if epoch not in self._plans:
            self._plans[epoch] = plan_epoch(self.cache.lengths, self.seq_length, self.seed, epoch,
                                            overlong=self.overlong, pad_to_multiple=self.pad_to_multiple)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plan(epoch).bins) // self.global_batch_size

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def locate(self, consumed_packs: int) -> tuple[int, int]:
        """(epoch, pack offset in that epoch) of the step that starts after ``consumed_packs``."""
        epoch, left = 0, consumed_packs
        while True:
            usable = self.steps_in_epoch(epoch) * self.global_batch_size
            if usable == 0:
                raise ValueError(f"seq_length={self.seq_length}: not one global batch of packs per epoch")
            if left < usable:
                return epoch, left
            left -= usable
            epoch += 1

    def microbatches(self, consumed_samples: int) -> List[Dict[str, object]]:
        epoch, offset = self.locate(consumed_samples)
        bins = self.plan(epoch).bins[offset: offset + self.global_batch_size]
        per_rank = self.global_batch_size // self.dp_size
        mine = bins[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]
        return [self.to_batch(b) for b in mine]

    def to_batch(self, bin_indices) -> Dict[str, object]:
        """The micro-batch of one pack (the samples ``bin_indices`` of the cache)."""
        return to_thd_batch(build_pack(self.cache, bin_indices, self.seq_length, self.pad_id,
                                       pad_to_multiple=self.pad_to_multiple, truncate=self.overlong == "truncate"))
