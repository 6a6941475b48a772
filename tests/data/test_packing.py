"""Tests for megatron_kimi.data.packing (best-fit-decreasing plans and THD packs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_kimi.data.packing import (
    best_fit_decreasing,
    build_pack,
    padded_lengths,
    plan_epoch,
)
from megatron_kimi.data.sft_cache import build_or_load_cache

CAPACITY = 4096
PAD = 0


def long_tailed_lengths(n: int = 5000, seed: int = 0, num_overlong: int = 5) -> np.ndarray:
    """Lognormal SFT-like lengths (median ~500, long tail), a few longer than CAPACITY."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(mean=np.log(500), sigma=1.0, size=n), 8, CAPACITY).astype(np.int64)
    lens[rng.choice(n, size=num_overlong, replace=False)] = rng.integers(CAPACITY + 1, 3 * CAPACITY, num_overlong)
    return lens


def reference_bfd(lengths, capacity, order=None) -> list[list[int]]:
    """Quadratic best-fit decreasing with the same tie rules (fullest bin, then earliest)."""
    items = list(range(len(lengths))) if order is None else list(order)
    items = sorted(items, key=lambda i: -lengths[i])  # sorted() is stable
    bins: list[list[int]] = []
    remaining: list[int] = []
    for i in items:
        best = None
        for b, r in enumerate(remaining):
            if r >= lengths[i] and (best is None or r < remaining[best]):
                best = b
        if best is None:
            bins.append([])
            remaining.append(capacity)
            best = len(bins) - 1
        bins[best].append(i)
        remaining[best] -= lengths[i]
    return bins


class FakeCache:
    """Random samples: ids in [10, 100), a mask of 0-prefix (prompt) then 1s (answer)."""

    def __init__(self, lengths, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        for n in lengths:
            ids = rng.integers(10, 100, size=int(n)).astype(np.int32)
            prompt = int(rng.integers(0, n)) if n > 1 else 0
            mask = np.zeros(int(n), dtype=np.uint8)
            mask[prompt:] = 1
            self.samples.append((ids, mask))
        self.lengths = np.array([len(s[0]) for s in self.samples], dtype=np.int64)

    def sample(self, i: int):
        return self.samples[i]


# --------------------------------------------------------------------------- best fit decreasing


def test_bfd_hand_example() -> None:
    # 5 -> bin0 (3 left); 4 -> bin1 (4 left); 3 -> bin0 (fullest fit, 0 left);
    # 3 -> bin1 (1 left); 2 -> new bin2; 1 -> bin1 (fullest fit).
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


@pytest.mark.parametrize("seed", range(6))
def test_bfd_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 64))
    lengths = rng.integers(0, capacity + 1, size=int(rng.integers(1, 300))).tolist()
    order = rng.permutation(len(lengths))
    assert best_fit_decreasing(lengths, capacity) == reference_bfd(lengths, capacity)
    assert best_fit_decreasing(lengths, capacity, order=order) == reference_bfd(lengths, capacity, order)
    subset = order[: len(order) // 2]
    assert best_fit_decreasing(lengths, capacity, order=subset) == reference_bfd(lengths, capacity, subset)


def test_bfd_ties_follow_order() -> None:
    lengths = [3, 3, 3, 3]
    assert best_fit_decreasing(lengths, 6, order=[2, 0, 3, 1]) == [[2, 0], [3, 1]]
    assert best_fit_decreasing(lengths, 6, order=[1, 3, 0, 2]) == [[1, 3], [0, 2]]


def test_bfd_errors_and_edge_cases() -> None:
    assert best_fit_decreasing([], 10) == []
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]]
    with pytest.raises(ValueError, match="> capacity"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="distinct"):
        best_fit_decreasing([1, 2], 10, order=[0, 0])
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing([1], 0)


def test_bfd_is_pure() -> None:
    lengths = np.array([5, 1, 4])
    order = np.array([2, 0, 1])
    best_fit_decreasing(lengths, 8, order=order)
    np.testing.assert_array_equal(lengths, [5, 1, 4])
    np.testing.assert_array_equal(order, [2, 0, 1])


# --------------------------------------------------------------------------- epoch plans


def _check_plan_covers(plan, lengths, expected_kept) -> None:
    flat = [i for b in plan.bins for i in b]
    assert sorted(flat) == sorted(expected_kept)  # every kept sample exactly once
    assert len(flat) == len(set(flat))
    eff = padded_lengths(np.minimum(lengths, plan.capacity), plan.pad_to_multiple)
    assert all(int(eff[b].sum()) <= plan.capacity for b in plan.bins)


def test_bfd_efficiency_long_tailed() -> None:
    lengths = long_tailed_lengths()
    plan = plan_epoch(lengths, CAPACITY, seed=1234, epoch=0)
    real = np.minimum(lengths, CAPACITY).sum()
    assert plan.stats["real_tokens"] == real
    assert plan.efficiency == pytest.approx(real / (plan.num_bins * CAPACITY))
    assert plan.efficiency >= 0.95
    # Near-optimal: the lower bound is ceil(real / capacity) bins.
    assert plan.num_bins <= int(np.ceil(real / CAPACITY)) * 1.05
    # Much better than one sample per row padded to capacity ...
    pad_to_capacity = real / (len(lengths) * CAPACITY)
    assert pad_to_capacity < 0.25 and plan.efficiency > 3 * pad_to_capacity
    # ... and than padding random batches of 8 to their longest sample.
    order = np.random.default_rng(0).permutation(len(lengths))
    eff_lens = np.minimum(lengths, CAPACITY)[order]
    batch_max = sum(int(eff_lens[i : i + 8].max()) * len(eff_lens[i : i + 8]) for i in range(0, len(order), 8))
    assert plan.efficiency > 1.5 * (real / batch_max)
    _check_plan_covers(plan, lengths, range(len(lengths)))


def test_plan_deterministic_and_epochs_differ() -> None:
    lengths = long_tailed_lengths(n=2000)
    a = plan_epoch(lengths, CAPACITY, seed=7, epoch=3)
    b = plan_epoch(lengths, CAPACITY, seed=7, epoch=3)
    c = plan_epoch(lengths, CAPACITY, seed=7, epoch=4)
    assert a.bins == b.bins and a.stats == b.stats
    assert a.bins != c.bins
    # packs differ as sets, not only in order
    assert {tuple(sorted(x)) for x in a.bins} != {tuple(sorted(x)) for x in c.bins}
    for plan in (a, c):
        _check_plan_covers(plan, lengths, range(len(lengths)))


def test_truncate_vs_drop_counts() -> None:
    lengths = long_tailed_lengths(n=1000, num_overlong=7)
    over = np.flatnonzero(lengths > CAPACITY)
    assert len(over) == 7
    trunc = plan_epoch(lengths, CAPACITY, seed=0, epoch=0, overlong="truncate")
    assert trunc.stats["overlong"] == 7 and trunc.stats["truncated"] == 7 and trunc.stats["dropped"] == 0
    assert trunc.stats["truncated_tokens"] == int((lengths[over] - CAPACITY).sum())
    np.testing.assert_array_equal(trunc.truncated, over)
    _check_plan_covers(trunc, lengths, range(len(lengths)))
    # a truncated sample fills a pack on its own
    for i in over:
        assert [b for b in trunc.bins if i in b] == [[int(i)]]

    drop = plan_epoch(lengths, CAPACITY, seed=0, epoch=0, overlong="drop")
    assert drop.stats["dropped"] == 7 and drop.stats["truncated"] == 0
    assert drop.stats["dropped_tokens"] == int(lengths[over].sum())
    assert drop.stats["packed_samples"] == 993
    np.testing.assert_array_equal(drop.dropped, over)
    _check_plan_covers(drop, lengths, sorted(set(range(len(lengths))) - set(over.tolist())))
    with pytest.raises(ValueError, match="overlong"):
        plan_epoch(lengths, CAPACITY, seed=0, epoch=0, overlong="wrap")


def test_empty_samples_dropped_and_counted() -> None:
    plan = plan_epoch([3, 0, 5], 8, seed=0, epoch=0)
    assert plan.stats["empty_dropped"] == 1
    _check_plan_covers(plan, np.array([3, 0, 5]), [0, 2])


def test_plan_with_pad_to_multiple() -> None:
    lengths = long_tailed_lengths(n=1500)
    plan = plan_epoch(lengths, CAPACITY, seed=0, epoch=0, pad_to_multiple=4)
    _check_plan_covers(plan, lengths, range(len(lengths)))
    assert plan.stats["padded_sample_tokens"] == int(padded_lengths(np.minimum(lengths, CAPACITY), 4).sum())
    with pytest.raises(ValueError, match="multiple"):
        plan_epoch(lengths, 4094, seed=0, epoch=0, pad_to_multiple=4)


# --------------------------------------------------------------------------- packs


def _check_pack(pack, cache, bin_indices, capacity, pad_to_multiple) -> None:
    tokens, labels = pack["tokens"], pack["labels"]
    loss_mask, pos = pack["loss_mask"], pack["position_ids"]
    assert tokens.shape == labels.shape == loss_mask.shape == pos.shape == (1, capacity)
    assert tokens.dtype == labels.dtype == pos.dtype == torch.int64
    assert loss_mask.dtype == torch.float32
    cu, cup = pack["cu_seqlens"], pack["cu_seqlens_padded"]
    assert cu.dtype == cup.dtype == torch.int32
    n = len(bin_indices)
    assert pack["num_samples"] == n and cu.shape == cup.shape == (n + 1,)
    t, lab, lm, p = tokens[0].numpy(), labels[0].numpy(), loss_mask[0].numpy(), pos[0].numpy()
    real = [min(len(cache.sample(i)[0]), capacity) for i in bin_indices]
    assert cu.tolist() == [0, *np.cumsum(real).tolist()]
    assert int(cup[0]) == 0 and int(cup[-1]) == capacity
    seg = np.diff(cup.numpy())
    assert (seg % pad_to_multiple == 0).all() and (seg >= np.array(real)).all()
    assert pack["max_seqlen"] == int(seg.max())
    is_real = np.zeros(capacity, dtype=bool)
    expected_loss = 0
    for k, i in enumerate(bin_indices):
        ids, mask = (np.asarray(a)[:capacity] for a in cache.sample(i))
        s, length = int(cup[k]), real[k]
        is_real[s : s + length] = True
        np.testing.assert_array_equal(t[s : s + length], ids)
        # position ids restart at 0 and count on through the segment's padding
        np.testing.assert_array_equal(p[s : s + seg[k]], np.arange(seg[k]))
        # labels: the next token of the same sample, never across a boundary
        np.testing.assert_array_equal(lab[s : s + length - 1], ids[1:])
        assert lab[s + length - 1] == PAD and lm[s + length - 1] == 0
        # loss mask: 1 exactly where the label is a loss token of the sample
        np.testing.assert_array_equal(lm[s : s + length - 1], mask[1:].astype(np.float32))
        expected_loss += int(mask[1:].sum())
    assert (t[~is_real] == PAD).all() and (lab[~is_real] == PAD).all() and (lm[~is_real] == 0).all()
    assert pack["num_loss_tokens"] == expected_loss == int(lm.sum())
    assert pack["num_tokens"] == sum(real)


@pytest.mark.parametrize("pad_to_multiple", [1, 4])
def test_build_pack_invariants(pad_to_multiple: int) -> None:
    capacity = 256
    lengths = np.random.default_rng(1).integers(1, 120, size=200)
    cache = FakeCache(lengths, seed=2)
    plan = plan_epoch(cache.lengths, capacity, seed=0, epoch=0, pad_to_multiple=pad_to_multiple)
    assert plan.efficiency > 0.9
    for b in plan.bins:
        pack = build_pack(cache, b, capacity, PAD, pad_to_multiple=pad_to_multiple)
        _check_pack(pack, cache, b, capacity, pad_to_multiple)


def test_build_pack_hand_example_pad4() -> None:
    cache = FakeCache([3, 5, 1])
    pack = build_pack(cache, [0, 1, 2], 16, PAD, pad_to_multiple=4)
    assert pack["cu_seqlens"].tolist() == [0, 3, 8, 9]
    assert pack["cu_seqlens_padded"].tolist() == [0, 4, 12, 16]  # tail joins the last segment
    assert pack["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert pack["max_seqlen"] == 8
    _check_pack(pack, cache, [0, 1, 2], 16, 4)


def test_build_pack_truncation_and_errors() -> None:
    cache = FakeCache([40, 5, 6])
    pack = build_pack(cache, [0], 32, PAD)
    assert pack["num_truncated"] == 1 and pack["num_tokens"] == 32
    _check_pack(pack, cache, [0], 32, 1)
    with pytest.raises(ValueError, match="capacity"):
        build_pack(cache, [0], 32, PAD, truncate=False)
    with pytest.raises(ValueError, match="plan with the same pad_to_multiple"):
        build_pack(cache, [1, 2], 12, PAD, pad_to_multiple=4)  # 8 + 8 > 12
    with pytest.raises(ValueError, match="at least one"):
        build_pack(cache, [], 32, PAD)


def test_truncated_plan_builds() -> None:
    lengths = [10, 50, 3, 64, 7]
    cache = FakeCache(lengths)
    plan = plan_epoch(cache.lengths, 32, seed=0, epoch=0, pad_to_multiple=4)
    assert plan.stats["truncated"] == 2
    for b in plan.bins:
        _check_pack(build_pack(cache, b, 32, PAD, pad_to_multiple=4), cache, b, 32, 4)


def test_packs_from_real_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: jsonl -> cache -> plan -> packs; loss only on assistant tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    records = []
    for k in range(60):
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"{a}+{b}=?" + " please" * int(rng.integers(0, 10))},
                    {"role": "assistant", "content": f"{a + b}" + " !" * int(rng.integers(0, 30))},
                ],
                "id": k,
            }
        )
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = build_or_load_cache(jsonl, "builtin:char", tmp_path / "cache", num_workers=2)
    from megatron_kimi.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:char", tmp_path / "cache")
    capacity = 256
    plan = plan_epoch(cache.lengths, capacity, seed=0, epoch=0, pad_to_multiple=2)
    assert plan.stats["truncated"] == 0 and plan.num_bins < len(cache)
    total_loss = 0
    for b in plan.bins:
        pack = build_pack(cache, b, capacity, tok.pad_token_id, pad_to_multiple=2)
        _check_pack(pack, cache, b, capacity, 2)
        total_loss += pack["num_loss_tokens"]
        # the loss labels decode to exactly the assistant answers + <|end|><eos>
        cup, cu = pack["cu_seqlens_padded"].tolist(), pack["cu_seqlens"].tolist()
        for k, i in enumerate(b):
            s, length = cup[k], cu[k + 1] - cu[k]
            lm = pack["loss_mask"][0, s : s + length].bool()
            text = "".join(tok.convert_ids_to_tokens(pack["labels"][0, s : s + length][lm].tolist()))
            answer = records[cache.meta(i)["id"]]["messages"][1]["content"]
            assert text == answer + "<|end|><eos>"
    assert total_loss == sum(int(cache.sample(i)[1][1:].sum()) for i in range(len(cache)))
