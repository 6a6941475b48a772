"""Global batches of fixed-length LM samples, split across DP ranks and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from megatron_kimi.data.corpus import SequenceSampler, TokenCorpus, make_batch


@dataclass
class LMBatchSource:
    corpus: TokenCorpus
    sampler: SequenceSampler
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def microbatches(self, consumed_samples: int) -> List[Dict[str, torch.Tensor]]:
        """Global batch = the next ``global_batch_size`` sampler positions; DP rank r takes the r-th
        contiguous slice, cut into micro-batches."""
        order = self.sampler.indices(consumed_samples, self.global_batch_size)
        per_rank = self.global_batch_size // self.dp_size
        mine = order[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return [make_batch(self.corpus, mine[i : i + mbs]) for i in range(0, per_rank, mbs)]
