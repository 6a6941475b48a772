"""Peak memory and time: naive full-logits token log-prob + entropy vs ``token_logprob_entropy``.

Both variants compute, for T tokens, ``logp_t = log softmax(h_t·Wᵀ/τ)[label_t]`` and the entropy
``H_t`` over a V-token vocabulary, then backpropagate ``Σ logp + Σ H`` to the hidden states and the
output-layer weight:

* **naive**: ``logits = (hidden @ W.T).float() / τ`` ([T, V] fp32) -> ``log_softmax`` -> gather, and
  ``-(exp(logp)·logp).sum(-1)`` — autograd keeps several [T, V] fp32 tensors alive;
* **fused**: :func:`megatron_kimi.kernels.fused_logprob.token_logprob_entropy` (cuBLAS blocks + Triton
  epilogues on CUDA; on CPU the same blocks with a PyTorch epilogue).

How peak memory is measured (the number is real, not a model):

* **CPU**: every variant runs in a *fresh subprocess* that imports the same modules, builds the same
  inputs (hidden, weight, labels; touched, so resident), runs one forward + backward and reports its
  peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``). Every child first runs both variants
  once on tiny tensors (so one-time costs, lazy imports, thread pools, are not charged to a variant);
  a *baseline* subprocess does everything except the measured forward + backward. ``peak`` = variant
  peak RSS − baseline peak RSS, i.e. all memory the forward + backward touched at its high-water mark:
  activations, temporaries, allocator and BLAS workspaces and the gradients ``hidden.grad`` /
  ``weight.grad`` (the latter, V×H, is inherent to both variants and is printed separately). Pages
  are counted once touched; buffers of this size are mmap-ed and returned to the OS when freed.
* **CUDA**: in-process, ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the
  forward (after ``reset_peak_memory_stats``), inputs allocated beforehand. Times are CUDA-event means
  over ``--repeat`` runs after a warm-up. It also reports the fused forward kernel's effective
  bandwidth (bytes of hidden + weight read / forward time) against a copy roofline
  (``torch.empty_like(x).copy_(x)`` of the same bytes, counted as read + write), and its TFLOP/s: at
  large T the kernel is compute-bound, so the bandwidth fraction is expected to be low.

    python tools/bench_logprob.py                                   # defaults below, ~1 min on 2 CPU cores
    python tools/bench_logprob.py --vocab 20000 --tokens 512 --json
    python tools/bench_logprob.py --tokens 8192 --hidden 4096     # on a GPU (bf16): gpu-check's size

CPU defaults (T=2048, H=256, V=151936, fp32) are chosen to run in about a minute on 2 cores; the
memory ratio depends on T, V, H and the block sizes (fused ≈ the V·H weight grad + one fp32 logits
block + one dz block + a T·H fp32 accumulator; naive ≈ 5·T·V fp32). ``--vocab-chunk`` /
``--token-block`` override the kernel's defaults (a 128 MiB fp32 logits block). Tiny sizes (the test)
sit at the allocator's noise floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2.0 ** 20


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--token-block", type=int, default=8192, help="tokens per logits block of the fused path")
    p.add_argument("--vocab-chunk", type=int, default=None,
                   help="vocab rows per logits block of the fused path (default: a 128 MiB fp32 block)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeat", type=int, default=5, help="timed runs on CUDA (CPU: one run per variant)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--child", choices=("baseline", "naive", "fused"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup(args, device):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    # filled in place: no transient copy that would raise the baseline's peak RSS above its inputs
    hidden = torch.empty(args.tokens, args.hidden, dtype=dtype, device=device).normal_(0.0, 0.5, generator=g)
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype, device=device).normal_(0.0, args.hidden ** -0.5,
                                                                                     generator=g)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def _naive(hidden, weight, labels, temperature):
    import torch

    logits_TV = (hidden @ weight.t()).float() / temperature
    logp_TV = torch.log_softmax(logits_TV, dim=-1)
    logp_T = logp_TV.gather(1, labels[:, None])[:, 0]
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return logp_T, entropy_T


def _step(variant, hidden, weight, labels, args):
    from megatron_kimi.kernels.fused_logprob import token_logprob_entropy

    if variant == "naive":
        logp, ent = _naive(hidden, weight, labels, args.temperature)
    else:
        logp, ent = token_logprob_entropy(hidden, weight, labels, temperature=args.temperature,
                                          token_block=args.token_block, vocab_chunk=args.vocab_chunk,
                                          backend=args.backend)
    (logp.sum() + ent.sum()).backward()
    return logp, ent


def _child(args) -> None:
    """One fresh process: inputs, (maybe) one forward + backward, then its peak RSS as JSON."""
    import torch

    from megatron_kimi.kernels import fused_logprob  # noqa: F401  (same imports in every child)

    # the same tiny warm-up in every child (baseline included), so that one-time costs (lazy imports,
    # the autograd engine's threads, BLAS/OpenMP pools) are part of the baseline and not of a variant
    tiny = argparse.Namespace(**{**vars(args), "tokens": 8, "vocab": 96, "hidden": min(args.hidden, 32),
                                 "token_block": 4, "vocab_chunk": 32})
    for variant in ("naive", "fused"):
        _step(variant, *_setup(tiny, "cpu"), tiny)
    hidden, weight, labels = _setup(args, "cpu")
    out = {"variant": args.child, "time_s": 0.0}
    if args.child != "baseline":
        t0 = time.perf_counter()
        _step(args.child, hidden, weight, labels, args)
        out["time_s"] = time.perf_counter() - t0
        out["grad_weight_bytes"] = weight.grad.numel() * weight.grad.element_size()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out))


def _run_child(variant, argv) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bench_cpu(args, argv) -> dict:
    base = _run_child("baseline", argv)
    res = {"device": "cpu", "threads": base["threads"], "variants": {}}
    for variant in ("naive", "fused"):
        r = _run_child(variant, argv)
        res["variants"][variant] = {"peak_bytes": r["peak_rss_bytes"] - base["peak_rss_bytes"], "time_s": r["time_s"]}
        res["grad_weight_bytes"] = r["grad_weight_bytes"]
    res["baseline_rss_bytes"] = base["peak_rss_bytes"]
    res["peak_measure"] = "peak RSS of a fresh process minus that of a baseline process holding only the inputs"
    return res


def _cuda_time(fn, repeat) -> float:
    import torch

    fn()  # warm-up (Triton compile, cuBLAS heuristics)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def _bench_cuda(args) -> dict:
    import torch

    from megatron_kimi.kernels.fused_logprob import token_logprob_entropy

    hidden, weight, labels = _setup(args, "cuda")
    res = {"device": torch.cuda.get_device_name(), "variants": {}}
    for variant in ("naive", "fused"):
        def run(variant=variant):
            hidden.grad = weight.grad = None
            _step(variant, hidden, weight, labels, args)

        run()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        res["grad_weight_bytes"] = weight.grad.numel() * weight.grad.element_size()
        res["variants"][variant] = {"peak_bytes": peak, "time_s": _cuda_time(run, args.repeat)}
    res["peak_measure"] = "torch.cuda.max_memory_allocated() delta over the inputs"

    # forward kernel vs a copy roofline of the same bytes
    with torch.no_grad():
        def forward():
            return token_logprob_entropy(hidden, weight, labels, temperature=args.temperature,
                                         token_block=args.token_block, vocab_chunk=args.vocab_chunk,
                                         backend=args.backend)

        t_fwd = _cuda_time(forward, args.repeat)
    nbytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t_copy = _cuda_time(lambda: torch.empty_like(src).copy_(src), args.repeat)
    flops = 2.0 * args.tokens * args.vocab * args.hidden
    res["forward"] = {"time_s": t_fwd, "bytes_read": nbytes, "gbps": nbytes / t_fwd / 1e9,
                      "copy_gbps": 2 * nbytes / t_copy / 1e9, "tflops": flops / t_fwd / 1e12}
    return res


def _report(args, res) -> None:
    v = res["variants"]
    res["ratio"] = v["fused"]["peak_bytes"] / max(1, v["naive"]["peak_bytes"])
    if args.json:
        keys = ("tokens", "hidden", "vocab", "token_block", "vocab_chunk", "temperature", "dtype", "backend")
        print(json.dumps({"config": {k: getattr(args, k) for k in keys}, **res}))
        return
    dev = res["device"] + (f", {res['threads']} threads" if "threads" in res else "")
    print(f"bench_logprob: T={args.tokens} H={args.hidden} V={args.vocab} "
          f"blocks={args.token_block}x{args.vocab_chunk or 'auto'} dtype={args.dtype} backend={args.backend} on {dev}")
    print(f"peak memory = {res['peak_measure']}")
    print(f"{'variant':<8} {'peak MiB':>10} {'time s':>9}")
    for name, r in v.items():
        print(f"{name:<8} {r['peak_bytes'] / MiB:>10.1f} {r['time_s']:>9.3f}")
    print(f"(both include weight.grad: {res['grad_weight_bytes'] / MiB:.1f} MiB; "
          f"naive fp32 logits alone: {args.tokens * args.vocab * 4 / MiB:.1f} MiB)")
    print(f"ratio fused/naive: {res['ratio']:.4f}  (goal <= 0.1)")
    if "forward" in res:
        f = res["forward"]
        print(f"fused forward: {f['time_s'] * 1e3:.3f} ms, {f['tflops']:.1f} TFLOP/s, "
              f"reads {f['bytes_read'] / MiB:.1f} MiB "
              f"-> {f['gbps']:.0f} GB/s vs copy roofline {f['copy_gbps']:.0f} GB/s "
              f"({100 * f['gbps'] / f['copy_gbps']:.1f}%)")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.child:
        _child(args)
        return
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if device == "cuda" else "fp32"
    child_argv = list(argv)
    if "--dtype" not in child_argv:
        child_argv += ["--dtype", args.dtype]
    res = _bench_cuda(args) if device == "cuda" else _bench_cpu(args, child_argv)
    _report(args, res)


if __name__ == "__main__":
    main()
