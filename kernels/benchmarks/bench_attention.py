"""Benchmark: Triton varlen flash attention vs PyTorch's varlen_attn and SDPA on the same packed causal work.

    python kernels/benchmarks/bench_attention.py                      # 8 uneven samples, 32k tokens
    python kernels/benchmarks/bench_attention.py --tokens 65536 --samples 16 --hq 32 --hkv 8 --d 128

CUDA, bf16 by default. Rows: the Triton kernel, PyTorch's own varlen flash attention
(``torch.nn.attention.varlen.varlen_attn``, causal = ``window_size=(-1, 0)``, K/V heads repeated for
GQA; where the installed torch has it), one SDPA ``is_causal`` call per sample (K/V heads
repeated to the query heads for GQA), and (if the packed batch is
small enough) one SDPA call with a block-diagonal causal mask. Prints ms and TFLOP/s for fwd and
fwd+bwd. Causal FLOPs: 4 * D * Hq * sum L(L+1)/2 forward, x2.5 for the backward (so x3.5 for
fwd+bwd). Without CUDA it prints that it needs CUDA and exits 0. Not a test (outside tests/).

``--sweep`` also times the Triton backward's tiles: each dK/dV candidate with the default dQ tiles,
each dQ candidate with the default dK/dV tiles (the two kernels run one after the other, so their
times add), then the best pair as the row ``triton best``. A config the GPU cannot fit (shared
memory, registers) is reported and skipped. Put the winner into ``_config`` of
``megatron_kimi/kernels/varlen_attention.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _lengths(total: int, n: int, seed: int) -> list[int]:
    """n uneven lengths summing to total (each >= 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.2
    lengths = (w / w.sum() * total).floor().long().clamp(min=1)
    lengths[0] += total - int(lengths.sum())
    return lengths.tolist()


def _time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the old 64 x 64 tile
DKDV_CANDIDATES = [(64, 64, 8, 2), (32, 128, 8, 3), (32, 128, 4, 5), (64, 128, 8, 3), (32, 64, 4, 4),
                   (16, 128, 4, 5)]
DQ_CANDIDATES = [(64, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 5), (128, 64, 8, 2), (64, 32, 4, 4)]


def _sweep(va, time_fwdbwd: Callable[[], float], flops: float) -> Optional[dict]:
    """Best backward tiles (see the module docstring); restores ``va._config`` before returning."""
    default = va._config
    results = {}

    def timed(kind, cfg):
        base = default

        def patched(D, dtype, kind=kind, cfg=cfg):
            return {**base(D, dtype), kind: cfg}

        va._config = patched
        try:
            ms = time_fwdbwd()
        except Exception as e:  # noqa: BLE001 - triton's OutOfResources etc.: skip this candidate
            print(f"sweep {kind}={cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            torch.cuda.empty_cache()
            return None
        finally:
            va._config = default
        print(f"sweep {kind}={cfg}: fwd+bwd {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")
        return ms

    for kind, cands in (("dkdv", DKDV_CANDIDATES), ("dq", DQ_CANDIDATES)):
        times = {cfg: timed(kind, cfg) for cfg in cands}
        ok = {c: t for c, t in times.items() if t is not None}
        if not ok:
            return None
        results[kind] = min(ok, key=ok.get)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mask-max-tokens", type=int, default=16384,
                    help="run the block-diagonal-mask SDPA row only up to this many tokens (T^2 mask)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also time the Triton backward's tile candidates")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (Triton kernels); nothing to benchmark here.")
        return 0

    import megatron_kimi.kernels.varlen_attention as va
    from megatron_kimi.kernels.varlen_attention import varlen_attention, varlen_attention_ref

    dev, dtype = "cuda", {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lengths = _lengths(args.tokens, args.samples, args.seed)
    T, hq, hkv, d = args.tokens, args.hq, args.hkv, args.d
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    bounds = cu.tolist()
    torch.manual_seed(args.seed)
    q = torch.randn(T, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(T, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(T, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    go = torch.randn(T, hq, d, device=dev, dtype=dtype)
    rep = hq // hkv

    def triton_fwd():
        return varlen_attention(q, k, v, cu, backend="triton")[0]

    def sdpa_per_sample_fwd():
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs = q[s:e].transpose(0, 1).unsqueeze(0)
            ks = k[s:e].transpose(0, 1).unsqueeze(0).repeat_interleave(rep, 1)
            vs = v[s:e].transpose(0, 1).unsqueeze(0).repeat_interleave(rep, 1)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs, 0)

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    max_len = max(lengths)

    def torch_varlen_fwd():
        ks, vs = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return varlen_attn(q, ks, vs, cu, cu, max_len, max_len, window_size=(-1, 0))

    mask = None
    if T <= args.mask_max_tokens:
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril_() & (seg[:, None] == seg[None, :])

    def sdpa_mask_fwd():
        qs = q.transpose(0, 1).unsqueeze(0)
        ks = k.transpose(0, 1).unsqueeze(0).repeat_interleave(rep, 1)
        vs = v.transpose(0, 1).unsqueeze(0).repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0].transpose(0, 1)

    # correctness first: the first sample (up to 4096 tokens) vs the fp32 reference
    with torch.no_grad():
        sl = slice(0, min(bounds[1], 4096))
        cu0 = torch.tensor([0, sl.stop - sl.start], dtype=torch.int32, device=dev)
        got = varlen_attention(q[sl], k[sl], v[sl], cu0, backend="triton")[0].float()
        want = varlen_attention_ref(q[sl], k[sl], v[sl], cu0)[0].float()
        print(f"check: max |triton - ref| = {(got - want).abs().max().item():.3e} "
              f"(max |ref| {want.abs().max().item():.3f})")

    pairs = sum(L * (L + 1) // 2 for L in lengths)
    flops_fwd = 4.0 * d * hq * pairs
    flops_fwdbwd = flops_fwd * 3.5
    rows = [("triton varlen", triton_fwd)]
    if varlen_attn is not None:
        rows.append(("torch varlen_attn", torch_varlen_fwd))
    rows.append(("sdpa per-sample", sdpa_per_sample_fwd))
    if mask is not None:
        rows.append(("sdpa block-diag mask", sdpa_mask_fwd))

    print(f"{args.samples} samples, lengths {lengths}, T={T}, Hq={hq}, Hkv={hkv}, D={d}, {args.dtype}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'impl':<22} {'fwd ms':>9} {'fwd TFLOP/s':>12} {'fwd+bwd ms':>11} {'fwd+bwd TFLOP/s':>16}")

    def fwdbwd_of(fwd):
        def fwdbwd():
            out = fwd()
            torch.autograd.grad(out, (q, k, v), go)
        return fwdbwd

    def report(name, fwd):
        try:
            with torch.no_grad():
                t_f = _time_ms(fwd, iters=args.iters)
            t_fb = _time_ms(fwdbwd_of(fwd), iters=args.iters)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<22} {'OOM':>9}")
            torch.cuda.empty_cache()
            return
        print(f"{name:<22} {t_f:>9.3f} {flops_fwd / t_f / 1e9:>12.1f} {t_fb:>11.3f} "
              f"{flops_fwdbwd / t_fb / 1e9:>16.1f}")

    for name, fwd in rows:
        report(name, fwd)
    if args.sweep:
        best = _sweep(va, lambda: _time_ms(fwdbwd_of(triton_fwd), warmup=2, iters=args.iters), flops_fwdbwd)
        if best is not None:
            default = va._config
            print(f"best tiles: dkdv={best['dkdv']} dq={best['dq']} (default: dkdv="
                  f"{default(d, dtype)['dkdv']} dq={default(d, dtype)['dq']})")
            va._config = lambda D, dt: {**default(D, dt), **best}
            try:
                report("triton best", triton_fwd)
            finally:
                va._config = default
    return 0


if __name__ == "__main__":
    sys.exit(main())
