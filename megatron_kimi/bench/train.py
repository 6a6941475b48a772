"""Training throughput of a config at a layout: tokens/s, model TFLOP/s per device, MFU, peak memory.

``python tools/bench_train.py CONFIG.yaml [key=value ...] [--steps N] [--warmup W] [--json OUT]``, one
process or under ``torchrun``/``srun`` like any command. It builds the real model/optimizer/trainer
from the config (``megatron-kimi train`` schema) and times full optimizer steps on synthetic
tokens of ``training.seq_length`` (random ids: throughput does not depend on the data). FLOPs come
from megatron_kimi/model/flops.py (causal attention, no recompute); MFU = achieved model TFLOP/s per
device / the device's dense peak for the dtype (``--peak-tflops`` to set it; on CPU only tokens/s).
After the timed steps one more step runs under ``torch.profiler`` and the table says where its time
went (megatron_kimi/bench/breakdown.py: attention, GEMMs, norms, RoPE, loss, optimizer, comms, other,
idle); ``--no-profile`` skips it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


@dataclass
class SyntheticLMSource:
    """Random-token micro-batches with the shapes ``lm_forward_step`` expects."""

    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    vocab_size: int
    dp_rank: int
    dp_size: int
    seed: int = 0

    def microbatches(self, consumed_samples: int) -> List[Dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + consumed_samples * 131 + self.dp_rank)
        n = self.global_batch_size // self.dp_size // self.micro_batch_size
        out = []
        for _ in range(n):
            ids = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_length + 1), generator=g)
            out.append({
                "tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                "loss_mask": torch.ones(self.micro_batch_size, self.seq_length),
                "position_ids": torch.arange(self.seq_length).expand(self.micro_batch_size, -1).contiguous(),
            })
        return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_bench(cfg, steps: int, warmup: int, peak: Optional[float], profile: bool = True) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_kimi.model.flops import num_params, peak_tflops, training_flops
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.metrics import peak_memory_mb
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    ctx = initialize(cfg)
    try:
        t, m = cfg.training, cfg.model
        vocab = m.vocab_size or _tokenizer_size(cfg)
        bundle = build_training_bundle(cfg, vocab, total_steps=warmup + steps + int(profile))
        trainer = Trainer(bundle, lm_forward_step, t.seq_length, t.micro_batch_size)
        source = SyntheticLMSource(t.global_batch_size, t.micro_batch_size, t.seq_length, vocab,
                                   parallel_state.get_data_parallel_rank(), ctx.dp_size, t.seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        consumed = 0
        for i in range(warmup + steps):
            batches = source.microbatches(consumed)
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step(batches)
            _sync()
            dt = time.perf_counter() - t0
            dt_t = torch.tensor([dt], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
            dist.all_reduce(dt_t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
            if i >= warmup:
                times.append(float(dt_t))
            consumed += t.global_batch_size
        breakdown = None
        if profile:
            from megatron_kimi.bench.breakdown import profile_step

            batches = source.microbatches(consumed)
            dist.barrier()
            seconds, wall = profile_step(lambda: trainer.train_step(batches), bundle.model, bundle.optimizer)
            breakdown = {"seconds": seconds, "wall_s": wall, "on_device": torch.cuda.is_available()}
        mem = torch.tensor([peak_memory_mb()], dtype=torch.float64,
                           device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        world = ctx.env.world_size
        tokens = t.global_batch_size * t.seq_length
        step_s = statistics.median(times)
        flops = training_flops(m, bundle.vocab_size, [t.seq_length] * t.global_batch_size)
        tflops = flops / step_s / world / 1e12
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        peak = peak if peak is not None else peak_tflops(device, cfg.precision.dtype)
        return {
            "device": device or "cpu", "world_size": world, "dtype": cfg.precision.dtype,
            "transformer_impl": _impl_used(bundle), "layout": {"tp": cfg.parallel.tensor, "pp": cfg.parallel.pipeline,
                                                               "cp": cfg.parallel.context, "dp": ctx.dp_size},
            "params": num_params(m, bundle.vocab_size), "seq_length": t.seq_length,
            "params_rank0": sum(p.numel() for c in bundle.model for p in c.parameters()),
            "global_batch_size": t.global_batch_size, "tokens_per_step": tokens,
            "steps": steps, "warmup": warmup, "step_time_s_median": step_s, "step_time_s_min": min(times),
            "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / world,
            "model_tflops_per_step": flops / 1e12,
            "tflops_per_device": tflops if device else None,
            "peak_tflops": peak if device else None,
            "mfu": (tflops / peak) if (device and peak) else None,
            "peak_memory_mb": float(mem),
            "peak_memory_kind": "cuda max allocated" if device else "process max RSS",
            "breakdown": breakdown,
        }
    finally:
        shutdown()


def _tokenizer_size(cfg) -> int:
    import tempfile

    from megatron_kimi.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return len(load_tokenizer(cfg.data.tokenizer, tmp))


def _impl_used(bundle) -> str:
    from megatron_kimi.model.sharding import unwrap

    names = {type(mod).__module__ for mod in unwrap(bundle.model[0]).modules()}
    return "transformer_engine" if any("transformer_engine" in n for n in names) else "local"


def format_table(r: dict) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("device", f"{r['device']} x {r['world_size']}"), ("dtype / impl", f"{r['dtype']} / {r['transformer_impl']}"),
        ("layout", "tp {tp} x pp {pp} x cp {cp} x dp {dp}".format(**r["layout"])),
        ("params", f"{r['params'] / 1e6:.2f} M"),
        ("tokens / step", f"{r['tokens_per_step']} ({r['global_batch_size']} x {r['seq_length']})"),
        ("step time", f"{r['step_time_s_median'] * 1e3:.1f} ms median, {r['step_time_s_min'] * 1e3:.1f} ms best "
                      f"({r['steps']} steps after {r['warmup']} warm-up)"),
        ("tokens/s", f"{r['tokens_per_s']:.4g} ({r['tokens_per_s_per_device']:.4g} per device)"),
        ("TFLOP/s / device", f(r["tflops_per_device"], ".1f")),
        ("MFU", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} % of {r['peak_tflops']} TFLOP/s"),
        ("peak memory", f"{r['peak_memory_mb']:.0f} MiB ({r['peak_memory_kind']})"),
    ]
    w = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
    if r.get("breakdown"):
        from megatron_kimi.bench.breakdown import format_breakdown

        b = r["breakdown"]
        text += "\n" + format_breakdown(b["seconds"], b["wall_s"], b["on_device"])
    return text


def main(argv=None) -> int:
    from megatron_kimi.cli import quiet_warnings
    from megatron_kimi.config import ConfigError, TrainConfig, load_config
    from megatron_kimi.platform import cpu_emulation

    quiet_warnings()
    ap = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled step and its time breakdown")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print("bench_train: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, TrainConfig)
    except ConfigError as e:
        print(f"bench_train: config error: {e}", file=sys.stderr)
        return 2
    cpu_emulation.activate()
    result = run_bench(cfg, args.steps, args.warmup, args.peak_tflops, profile=not args.no_profile)
    import os

    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(format_table(result), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    return 0
