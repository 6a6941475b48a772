"""Sequence packing for SFT: best-fit-decreasing bins and Megatron THD packs.

Variable-length SFT samples are packed into fixed-capacity rows ("packs") so
that almost no compute is spent on padding.  Attention stays within a sample
through ``cu_seqlens`` (Megatron's ``PackedSeqParams`` / THD layout).

* :func:`best_fit_decreasing` -- the bin packing itself (pure, deterministic,
  ``O(n log capacity)``).
* :func:`plan_epoch` -- one epoch's packs: per-epoch tie order and pack order
  from ``np.random.default_rng(seed + epoch)``, with over-long samples
  truncated or dropped (counted in the plan's stats, never silently).
* :func:`build_pack` -- the tensors of one pack.

Padding to a multiple (context parallelism needs every sample's length to be
a multiple of ``2 * cp``): each sample occupies its length rounded up to
``pad_to_multiple``; :func:`plan_epoch` packs those padded lengths, so a
planned bin always fits.  The rest of the row after the last sample is
appended to the **last** segment's padded length, so ``cu_seqlens`` and
``cu_seqlens_padded`` both have ``num_samples + 1`` entries and
``cu_seqlens_padded[-1] == capacity`` (``capacity`` must itself be a multiple
of ``pad_to_multiple``, so every padded segment stays a multiple).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

OVERLONG_POLICIES: tuple[str, ...] = ("truncate", "drop", "error")


class _Fenwick:
    """Counts per value ``0..size-1`` with prefix sums and k-th element search."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tree = [0] * (size + 1)
        self.top = 1 << (size.bit_length() - 1) if size else 0

    def add(self, i: int, delta: int) -> None:
        i += 1
        tree, n = self.tree, self.size
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum of counts of values ``0..i`` (0 when ``i < 0``)."""
        i += 1
        s, tree = 0, self.tree
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    def kth(self, k: int) -> int:
        """Smallest value ``v`` with ``prefix(v) >= k`` (``k >= 1``)."""
        pos, step, tree, n = 0, self.top, self.tree, self.size
        while step:
            nxt = pos + step
            if nxt <= n and tree[nxt] < k:
                pos = nxt
                k -= tree[nxt]
            step >>= 1
        return pos


def best_fit_decreasing(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    order: Sequence[int] | np.ndarray | None = None,
) -> list[list[int]]:
    """Pack items into bins of ``capacity`` with best-fit decreasing.

    Items are taken by length, longest first; equal lengths keep their
    position in ``order`` (the items to pack, default ``range(len(lengths))``;
    it may be a subset).  Each item goes into the fullest open bin that still
    fits it (ties: the earliest-opened bin), else a new bin.  Returns the bins
    in opening order, each a list of item indices in insertion order.  Runs in
    ``O(n log n + n log capacity)`` (a Fenwick tree over remaining capacity).
    Raises ``ValueError`` for a negative length or one above ``capacity``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if order is None:
        items = np.arange(len(lens), dtype=np.int64)
    else:
        items = np.asarray(order, dtype=np.int64).reshape(-1)
    if len(items) == 0:
        return []
    if len(np.unique(items)) != len(items) or items.min() < 0 or items.max() >= len(lens):
        raise ValueError("order must hold distinct item indices in [0, len(lengths))")
    sel = lens[items]
    if sel.min() < 0:
        raise ValueError("lengths must be >= 0")
    if sel.max() > capacity:
        bad = int(items[np.argmax(sel)])
        raise ValueError(f"item {bad} has length {int(lens[bad])} > capacity {capacity}")
    ranked = items[np.argsort(-sel, kind="stable")]

    tree = _Fenwick(capacity + 1)  # counts of open bins by remaining capacity
    by_remaining: dict[int, list[int]] = {}  # remaining capacity -> heap of bin ids
    bins: list[list[int]] = []
    for item, length in zip(ranked.tolist(), lens[ranked].tolist()):
        below = tree.prefix(length - 1)  # bins too full for this item
        if below == len(bins):
            bin_id, remaining = len(bins), capacity
            bins.append([])
        else:
            remaining = tree.kth(below + 1)  # smallest remaining capacity >= length
            bin_id = heapq.heappop(by_remaining[remaining])
            tree.add(remaining, -1)
        bins[bin_id].append(item)
        remaining -= length
        tree.add(remaining, 1)
        heapq.heappush(by_remaining.setdefault(remaining, []), bin_id)
    return bins


def padded_lengths(lengths: Sequence[int] | np.ndarray, pad_to_multiple: int) -> np.ndarray:
    """``lengths`` rounded up to a multiple of ``pad_to_multiple`` (int64)."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    lens = np.asarray(lengths, dtype=np.int64)
    return -(-lens // pad_to_multiple) * pad_to_multiple


@dataclass
class PackPlan:
    """One epoch's packs: ``bins[k]`` lists the sample indices of pack ``k`` (in pack order)."""

    bins: list[list[int]]
    capacity: int
    pad_to_multiple: int
    seed: int
    epoch: int
    overlong: str
    truncated: np.ndarray = field(repr=False)  # indices of samples cut to fit
    dropped: np.ndarray = field(repr=False)  # indices of samples left out (over-long or empty)
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def num_bins(self) -> int:
        return len(self.bins)

    @property
    def efficiency(self) -> float:
        """Real tokens / (num_bins * capacity)."""
        return float(self.stats["efficiency"])


def plan_epoch(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    seed: int,
    epoch: int,
    overlong: str = "truncate",
    pad_to_multiple: int = 1,
) -> PackPlan:
    """Plan the packs of one epoch.

    ``rng = np.random.default_rng(seed + epoch)``: ``rng.permutation(n)`` sets
    the tie order among equal lengths, then the bins are shuffled with the same
    ``rng`` -- different epochs give different packs, the same ``(seed, epoch)``
    the same.  Samples longer than ``capacity`` are cut to ``capacity``
    (``"truncate"``, see :func:`build_pack`) or left out (``"drop"``), or are a
    ``ValueError`` (``"error"``); empty samples are always left out.  Both are
    counted in ``stats``.  Bins are planned on lengths rounded up to
    ``pad_to_multiple`` (``capacity`` must be a multiple of it).
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if pad_to_multiple < 1 or capacity % pad_to_multiple:
        raise ValueError(
            f"capacity {capacity} must be a positive multiple of pad_to_multiple {pad_to_multiple}"
        )
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if len(lens) and lens.min() < 0:
        raise ValueError("lengths must be >= 0")
    n = len(lens)
    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(n)

    over = lens > capacity
    empty = lens == 0
    if overlong == "error" and over.any():
        first = int(np.flatnonzero(over)[0])
        raise ValueError(f"{int(over.sum())} sample(s) longer than capacity {capacity}, the first is sample "
                         f"{first} ({int(lens[first])} tokens) (overlong='error')")
    if overlong == "drop":
        excluded = over | empty
        truncated = np.zeros(0, dtype=np.int64)
    else:
        excluded = empty
        truncated = np.flatnonzero(over)
    effective = np.minimum(lens, capacity)
    padded = padded_lengths(effective, pad_to_multiple)
    order = perm[~excluded[perm]]
    bins = best_fit_decreasing(padded, capacity, order=order)
    bins = [bins[j] for j in rng.permutation(len(bins))]

    kept = ~excluded
    real = int(effective[kept].sum())
    num_bins = len(bins)
    stats: dict[str, Any] = {
        "samples": n,
        "packed_samples": int(kept.sum()),
        "bins": num_bins,
        "capacity": capacity,
        "pad_to_multiple": pad_to_multiple,
        "real_tokens": real,
        "padded_sample_tokens": int(padded[kept].sum()),
        "efficiency": real / (num_bins * capacity) if num_bins else 0.0,
        "overlong": int(over.sum()),
        "truncated": int(len(truncated)),
        "truncated_tokens": int((lens[truncated] - capacity).sum()) if len(truncated) else 0,
        "dropped": int((over & excluded).sum()),
        "dropped_tokens": int(lens[over & excluded].sum()),
        "empty_dropped": int(empty.sum()),
    }
    return PackPlan(
        bins=bins,
        capacity=capacity,
        pad_to_multiple=pad_to_multiple,
        seed=seed,
        epoch=epoch,
        overlong=overlong,
        truncated=truncated,
        dropped=np.flatnonzero(excluded),
        stats=stats,
    )


class SampleSource(Protocol):
    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


def build_pack(
    cache: SampleSource,
    bin_indices: Sequence[int],
    capacity: int,
    pad_id: int,
    pad_to_multiple: int = 1,
    truncate: bool = True,
) -> dict[str, Any]:
    """Build one packed row (Megatron THD) from the samples ``bin_indices`` of ``cache``.

    ``cache.sample(i)`` gives ``(ids, loss_mask)`` (e.g. an
    :class:`~megatron_kimi.data.sft_cache.SFTCache`).  A sample longer than
    ``capacity`` keeps its first ``capacity`` tokens when ``truncate`` (else
    ``ValueError``).  Returns

    * ``tokens``, ``labels`` -- ``int64 [1, capacity]``; ``labels`` is the next
      token of the same sample, ``pad_id`` at each sample's last token and on
      padding;
    * ``loss_mask`` -- ``float32 [1, capacity]``, 1 where the label is a
      loss token of the sample (the mask shifted by one within the sample);
    * ``position_ids`` -- ``int64 [1, capacity]``, 0 at the start of every
      sample, counting on through that sample's padding;
    * ``cu_seqlens`` / ``cu_seqlens_padded`` -- ``int32 [n + 1]``: the
      cumulative real lengths, and the cumulative lengths padded to
      ``pad_to_multiple`` with the row's tail added to the last segment
      (``[-1] == capacity``).  This is the Transformer Engine / Megatron THD
      convention: sample ``k`` occupies row positions
      ``cu_seqlens_padded[k] : cu_seqlens_padded[k] + real_len[k]``; with
      ``pad_to_multiple == 1`` the two agree except for the final entry;
    * ``max_seqlen`` -- the largest padded segment length (an upper bound valid
      for both ``cu_seqlens``), ``num_samples``, ``num_tokens`` (real tokens),
      ``num_loss_tokens``, ``num_truncated``.

    Raises ``ValueError`` for an empty bin, an empty sample, or samples whose
    padded lengths exceed ``capacity`` (plan with the same ``pad_to_multiple``).
    """
    if len(bin_indices) == 0:
        raise ValueError("build_pack needs at least one sample")
    if pad_to_multiple < 1 or capacity % pad_to_multiple:
        raise ValueError(
            f"capacity {capacity} must be a positive multiple of pad_to_multiple {pad_to_multiple}"
        )
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    num_truncated = 0
    for i in bin_indices:
        ids, mask = cache.sample(int(i))
        if len(ids) != len(mask):
            raise ValueError(f"sample {i}: ids and mask lengths differ ({len(ids)} vs {len(mask)})")
        if len(ids) == 0:
            raise ValueError(f"sample {i} is empty")
        if len(ids) > capacity:
            if not truncate:
                raise ValueError(f"sample {i} has {len(ids)} tokens > capacity {capacity}")
            ids, mask = ids[:capacity], mask[:capacity]
            num_truncated += 1
        samples.append((ids, mask))
    real = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
    padded = padded_lengths(real, pad_to_multiple)
    if int(padded.sum()) > capacity:
        raise ValueError(
            f"samples {list(bin_indices)} need {int(padded.sum())} tokens padded to multiples of "
            f"{pad_to_multiple} > capacity {capacity}; plan with the same pad_to_multiple"
        )
    padded[-1] += capacity - int(padded.sum())  # the row's tail joins the last segment

    tokens = np.full(capacity, pad_id, dtype=np.int64)
    labels = np.full(capacity, pad_id, dtype=np.int64)
    loss_mask = np.zeros(capacity, dtype=np.float32)
    position_ids = np.zeros(capacity, dtype=np.int64)
    start = 0
    for (ids, mask), seg in zip(samples, padded.tolist()):
        length = len(ids)
        tokens[start : start + length] = ids
        labels[start : start + length - 1] = ids[1:]
        loss_mask[start : start + length - 1] = mask[1:]
        position_ids[start : start + seg] = np.arange(seg)
        start += seg

    cu_seqlens = np.zeros(len(samples) + 1, dtype=np.int32)
    cu_seqlens_padded = np.zeros(len(samples) + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(real)
    cu_seqlens_padded[1:] = np.cumsum(padded)
    return {
        "tokens": torch.from_numpy(tokens).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "loss_mask": torch.from_numpy(loss_mask).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "cu_seqlens_padded": torch.from_numpy(cu_seqlens_padded),
        "max_seqlen": int(padded.max()),
        "num_samples": len(samples),
        "num_tokens": int(real.sum()),
        "num_loss_tokens": int(loss_mask.sum()),
        "num_truncated": num_truncated,
    }
