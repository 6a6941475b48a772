"""``tools/plan_memory.py CONFIG [key=value ...] [--world N | --nodes N]``: will this config fit on 80 GB GPUs?

Without ``--world`` or ``--nodes`` the world is the smallest one that holds the config's layout
(tp x pp x cp with data-parallel 1) in whole nodes of ``--gpus-per-node`` GPUs, i.e. the least common
multiple of the two; the assumed world is printed.

Reads any command's config (train / sft / rl; for sft the longest stage counts), prints the per-GPU
estimate of megatron_kimi/model/memory.py part by part and whether it fits (``--capacity-gib``).
``--measure`` also runs two real optimizer steps of the config on this machine (one process, the
config's layout must then be 1 rank) and prints measured vs planned for the static part (weights,
grads, optimizer: memory held after a step) and the step's peak on top of it (activations + logits):
on CUDA from the allocator's counters; on CPU the static part is the bytes of every live tensor
storage (gc walk) and the step peak the process RSS sampled every millisecond above its level
before the step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import yaml

GIB = 2**30


def _schema(path: str):
    from megatron_kimi.config import RLConfig, SFTConfig, TrainConfig

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    if "stages" in data:
        return SFTConfig
    if "rl" in data or "rollout" in data:
        return RLConfig
    return TrainConfig


def plan_for_config(cfg, world: int, capacity_gib: float):
    from megatron_kimi.model.flops import padded_vocab_size
    from megatron_kimi.model.memory import layout_from, plan

    if hasattr(cfg, "stages"):
        seq = max(st.seq_length for st in cfg.stages)
        mbs, gbs = 1, max(st.packs_per_step() for st in cfg.stages)
    else:
        seq, mbs, gbs = cfg.training.seq_length, cfg.training.micro_batch_size, cfg.training.global_batch_size
    lay = layout_from(cfg.parallel, world)
    vocab = padded_vocab_size(cfg.model.vocab_size or 32000, cfg.model.make_vocab_size_divisible_by, lay.tp)
    micro = max(1, gbs // (mbs * lay.dp))
    return plan(cfg.model, vocab, lay, seq * mbs, cfg.precision.dtype, cfg.recompute, micro,
                grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32, capacity_gib=capacity_gib)


def default_world(parallel, gpus_per_node: int) -> int:
    """Smallest whole-node world divisible by tp x pp x cp (DP 1 when the layout fills whole nodes)."""
    mp = parallel.tensor * parallel.pipeline * parallel.context
    return math.lcm(mp, gpus_per_node)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    def __init__(self):
        self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage of a live tensor (CPU: what the static part really holds)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                st = obj.untyped_storage()
                key = st.data_ptr()
                if key and key not in seen:
                    seen.add(key)
                    total += st.nbytes()
        except Exception:  # noqa: BLE001 - odd tensor subclasses: skip
            continue
    return total


def measure(cfg) -> dict:
    """Static bytes (held after a step, minus before the model) and the step peak above it."""
    import gc

    import torch

    from megatron_kimi.bench.train import SyntheticLMSource
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    ctx = initialize(cfg)
    if ctx.env.world_size != 1:
        raise ValueError("--measure runs one process (a layout of one rank)")
    cuda = torch.cuda.is_available()
    try:
        t = cfg.training
        gc.collect()
        base = torch.cuda.memory_allocated() if cuda else live_tensor_bytes()
        bundle = build_training_bundle(cfg, cfg.model.vocab_size, total_steps=4)
        trainer = Trainer(bundle, lm_forward_step, t.seq_length, t.micro_batch_size)
        src = SyntheticLMSource(t.global_batch_size, t.micro_batch_size, t.seq_length, cfg.model.vocab_size, 0, 1)
        trainer.train_step(src.microbatches(0))  # allocates the optimizer state
        gc.collect()
        static = (torch.cuda.memory_allocated() if cuda else live_tensor_bytes()) - base
        batches = src.microbatches(t.global_batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            trainer.train_step(batches)
            peak = torch.cuda.max_memory_allocated() - base - static
        else:
            held = _rss()
            with _PeakSampler() as s:
                trainer.train_step(batches)
            peak = s.peak - held
        return {"static": static, "step_peak": peak,
                "kind": "cuda allocator" if cuda else "live tensors (static), RSS sampled each ms (step peak)"}
    finally:
        shutdown()


def main(argv=None) -> int:
    from megatron_kimi.cli import quiet_warnings
    from megatron_kimi.config import ConfigError, load_config
    from megatron_kimi.model.memory import format_plan

    quiet_warnings()
    ap = argparse.ArgumentParser(prog="plan_memory", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world", type=int, default=None,
                    help="GPUs in the job (default: --nodes x --gpus-per-node; without --nodes the smallest "
                         "whole-node world that holds tp x pp x cp)")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--capacity-gib", type=float, default=80.0, help="per-GPU memory (H100 SXM: 80)")
    ap.add_argument("--measure", action="store_true", help="also measure 2 real steps here (1-rank layouts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_intermixed_args(argv)
    for flag in ("world", "nodes", "gpus_per_node"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"plan_memory: error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, args.overrides, _schema(args.config))
        if args.world is not None:
            world = args.world
        elif args.nodes is not None:
            world = args.nodes * args.gpus_per_node
        else:
            world = default_world(cfg.parallel, args.gpus_per_node)
            print(f"plan_memory: assuming world {world} = {world // args.gpus_per_node} node(s) x "
                  f"{args.gpus_per_node} GPUs, the smallest that holds tp x pp x cp = "
                  f"{cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context} "
                  f"(pass --world or --nodes to choose)")
        pl = plan_for_config(cfg, world, args.capacity_gib)
    except (ConfigError, ValueError) as e:
        print(f"plan_memory: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(pl, f"{args.config}: per-GPU memory estimate ({world} GPUs)"))
    result = {"parts_gib": {k: v / GIB for k, v in pl.parts.items()}, "total_gib": pl.total / GIB, "fits": pl.fits,
              "world": world, "world_assumed": args.world is None and args.nodes is None}
    if args.measure:
        import os

        import torch

        if not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            # glibc keeps freed heap memory (and raises its mmap threshold after frees), so RSS would
            # not drop between steps; with a fixed low threshold large tensors are mmapped and
            # returned at free, and the RSS peak measures live memory. Re-exec with it set.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        from megatron_kimi.platform import cpu_emulation

        cpu_emulation.activate()
        m = measure(cfg)
        planned_static = pl.parts["weights"] + pl.parts["grads"] + pl.parts["optimizer"]
        planned_peak = sum(pl.parts[k] for k in ("activations", "bwd_transient", "logits", "cp_kv_gather"))
        print(f"\nmeasured ({m['kind']}): static {m['static'] / 2**20:.1f} MiB (planned {planned_static / 2**20:.1f}), "
              f"step peak above it {m['step_peak'] / 2**20:.1f} MiB (planned "
              f"{planned_peak / 2**20:.1f})")
        result["measured"] = {"static_mib": m["static"] / 2**20, "step_peak_mib": m["step_peak"] / 2**20,
                              "planned_static_mib": planned_static / 2**20, "planned_peak_mib": planned_peak / 2**20,
                              "kind": m["kind"]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if pl.fits else 1
