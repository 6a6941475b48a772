"""Benchmark SFT sequence packing against padding.

Generates a long-tailed (lognormal) length distribution, or reads real lengths
from a jsonl file through the SFT token cache (``--jsonl`` + ``--tokenizer``),
and prints one table comparing best-fit-decreasing packing
(:func:`megatron_kimi.data.packing.plan_epoch`) with padding every sample to
the capacity and padding random batches to their longest sample.  Efficiency
is real tokens / tokens in the rows.

    python tools/bench_packing.py
    python tools/bench_packing.py --samples 100000 --capacity 32768 --median 2000
    python tools/bench_packing.py --jsonl data/sft.jsonl --tokenizer builtin:char
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from megatron_kimi.data.packing import build_pack, plan_epoch


def synthetic_lengths(n: int, capacity: int, median: float, sigma: float, overlong: int, seed: int) -> np.ndarray:
    """Lognormal lengths in ``[8, capacity]`` with ``overlong`` samples longer than ``capacity``."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(median), sigma, size=n), 8, capacity).astype(np.int64)
    k = min(overlong, n)
    if k:
        lens[rng.choice(n, size=k, replace=False)] = rng.integers(capacity + 1, 3 * capacity, size=k)
    return lens


class _SyntheticCache:
    """Samples of the given lengths (constant ids, all-ones mask) for timing build_pack."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths
        self._ids = np.arange(int(lengths.max()) if len(lengths) else 1, dtype=np.int32) % 1000 + 10
        self._mask = np.ones_like(self._ids, dtype=np.uint8)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.lengths[i])
        return self._ids[:n], self._mask[:n]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--median", type=float, default=500.0, help="median synthetic length")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma (tail weight)")
    p.add_argument("--overlong", type=int, default=5, help="synthetic samples longer than capacity")
    p.add_argument("--overlong-policy", choices=("truncate", "drop"), default="truncate")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for pad-to-batch-max")
    p.add_argument("--pad-to-multiple", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--jsonl", default=None, help="read lengths from this SFT jsonl instead")
    p.add_argument("--tokenizer", default="builtin:char", help="tokenizer dir or builtin:char (with --jsonl)")
    p.add_argument("--cache-root", default=None, help="SFT cache root (default: a temp dir)")
    p.add_argument("--num-workers", type=int, default=2)
    return p.parse_args(argv)


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    cap = args.capacity
    source = "synthetic lognormal"
    cache = None
    if args.jsonl:
        from megatron_kimi.data.sft_cache import build_or_load_cache

        root = args.cache_root or tempfile.mkdtemp(prefix="sft_cache_")
        t0 = time.perf_counter()
        cache = build_or_load_cache(args.jsonl, args.tokenizer, root, num_workers=args.num_workers)
        print(f"cache {cache.path} ({'built' if cache.built else 'reused'} in {time.perf_counter() - t0:.2f}s)")
        lengths = np.asarray(cache.lengths, dtype=np.int64)
        source = args.jsonl
    else:
        lengths = synthetic_lengths(args.samples, cap, args.median, args.sigma, args.overlong, args.seed)
    n = len(lengths)
    if n == 0:
        raise SystemExit("no samples")

    t0 = time.perf_counter()
    plan = plan_epoch(lengths, cap, args.seed, 0, overlong=args.overlong_policy, pad_to_multiple=args.pad_to_multiple)
    t_plan = time.perf_counter() - t0
    src = cache if cache is not None else _SyntheticCache(lengths)
    t0 = time.perf_counter()
    for b in plan.bins:
        build_pack(src, b, cap, 0, pad_to_multiple=args.pad_to_multiple)
    t_build = time.perf_counter() - t0

    eff_lens = np.minimum(lengths, cap)
    if args.overlong_policy == "drop":
        eff_lens = eff_lens[lengths <= cap]
    real = int(eff_lens.sum())
    order = np.random.default_rng(args.seed).permutation(len(eff_lens))
    shuffled = eff_lens[order]
    bs = args.batch_size
    t0 = time.perf_counter()
    batch_tokens = sum(int(shuffled[i : i + bs].max()) * len(shuffled[i : i + bs]) for i in range(0, len(shuffled), bs))
    t_batch = time.perf_counter() - t0

    s = plan.stats
    print(
        f"{source}: samples={n} capacity={cap} real_tokens={real} mean_len={lengths.mean():.0f} "
        f"max_len={int(lengths.max())} overlong={s['overlong']} "
        f"(truncated={s['truncated']}, dropped={s['dropped']}) pad_to_multiple={args.pad_to_multiple}"
    )
    header = ["method", "samples", "capacity", "rows", "row tokens", "efficiency", "time_s"]
    rows = [
        ["BFD packing (plan_epoch)", n, cap, plan.num_bins, plan.num_bins * cap, plan.efficiency, f"{t_plan:.3f}"],
        ["  + build_pack, all packs", n, cap, plan.num_bins, plan.num_bins * cap, plan.efficiency, f"{t_build:.3f}"],
        ["pad each sample to capacity", n, cap, len(eff_lens), len(eff_lens) * cap, real / (len(eff_lens) * cap), "-"],
        [f"pad to batch max (bs={bs})", n, cap, len(eff_lens), batch_tokens, real / batch_tokens, f"{t_batch:.3f}"],
    ]
    cells = [[str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), f"{100 * r[5]:.2f}%", str(r[6])] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    print(_row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(_row(c, widths))


if __name__ == "__main__":
    main()
