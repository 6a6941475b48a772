"""Preallocated slot KV cache: one K and one V tensor for all layers, never grown.

Layout ``[layers, slots, local_kv_heads, max_seq_len, head_dim]`` (per layer, per slot the heads are
``[kv_heads, seq, head_dim]``, the layout scaled-dot-product attention reads without a copy). The
engine keeps the *active* sequences compacted in slots ``0..B-1``: a decode step then attends over
the views ``k[l, :B, :, :L]`` (L = longest active length) with a per-slot length mask, and a
sequence that finishes is replaced by the last active one (:meth:`move`), so no step ever pays for
a freed slot.
"""

from __future__ import annotations

from typing import Sequence

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, slots, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_seq_len = max_seq_len

    def matches(self, num_layers, slots, kv_heads, max_seq_len, head_dim, dtype, device) -> bool:
        return (tuple(self.k.shape) == (num_layers, slots, kv_heads, max_seq_len, head_dim)
                and self.k.dtype == dtype and self.k.device == torch.device(device))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copy the first ``length`` positions of slots ``src`` into slots ``dst`` (disjoint sets)."""
        if not src:
            return
        s = torch.tensor(list(src), device=self.k.device)
        d = torch.tensor(list(dst), device=self.k.device)
        for t in (self.k, self.v):
            t[:, d, :, :length] = t[:, s, :, :length]
