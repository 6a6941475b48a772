"""``megatron-kimi <command> CONFIG.yaml [dotted.key=value ...]`` — the CLI, parsed here only.

Works as a single process, under ``torchrun`` and under ``srun`` (see platform/launch.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

from megatron_kimi.config import ConfigError, DPOConfig, RLConfig, SFTConfig, TrainConfig, load_config

# command -> (config schema, "module:function" that runs it)
COMMANDS: Dict[str, Tuple[type, str, str]] = {
    "train": (TrainConfig, "megatron_kimi.commands.train:run", "causal-LM training on a corpus"),
    "sft": (SFTConfig, "megatron_kimi.commands.sft:run", "packed SFT over one or more stages"),
    "rl": (RLConfig, "megatron_kimi.commands.rl:run", "online mirror-descent RL with verifiable rewards"),
    "difficulty": (RLConfig, "megatron_kimi.commands.difficulty:run",
                   "each RL prompt's difficulty (1 - pass rate of a checkpoint) into a jsonl"),
    "sample": (RLConfig, "megatron_kimi.commands.sample:run",
               "shortest rejection sampling: n samples per prompt, the shortest correct -> SFT jsonl"),
    "eval": (RLConfig, "megatron_kimi.commands.eval:run",
             "held-out accuracy and response length per checkpoint (extra args: checkpoint paths), PNG"),
    "dpo": (DPOConfig, "megatron_kimi.commands.dpo:run",
            "DPO on preference pairs (long2short: shortest correct vs. wrong or overlong samples)"),
}


def eval_overrides(overrides: Sequence[str]) -> list:
    """``megatron-kimi eval``: its arguments without ``=`` are checkpoint paths -> ``eval.checkpoints``."""
    paths = [o for o in overrides if "=" not in o]
    rest = [o for o in overrides if "=" in o]
    if not paths:
        return rest
    if any(o.split("=", 1)[0] == "eval.checkpoints" for o in rest):
        raise ConfigError("checkpoints given both as paths and as eval.checkpoints=...; use one of them")
    return rest + ["eval.checkpoints=" + json.dumps(paths)]


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-kimi", description="Kimi k1.5 recipe on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (run_dir=PATH, ...)"
                       + ("; and checkpoint paths to evaluate" if name == "eval" else ""))
    pf = sub.add_parser("preflight", help="check a launch (config, layout vs world, GPUs); prints the run dir")
    pf.add_argument("target", choices=sorted(COMMANDS), help="the command that will run")
    pf.add_argument("config", help="YAML config file")
    pf.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pf.add_argument("--world", type=int, required=True, help="number of ranks the launch will start")
    pf.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: --world)")
    pf.add_argument("--gpus-per-node", default=None, help="GPUs the job asked for per node (Slurm's value)")
    return parser


# Import-time notices from Megatron-Core about optional GPU packages; KIMI_SHOW_WARNINGS=1 keeps them.
_QUIET = (r".*(Transformer Engine|Apex) (is|are) not installed.*", r".*is deprecated.*", r".*cuda_graph_scope.*",
          r".*torch\.jit.*")


def quiet_warnings() -> None:
    import os
    import warnings

    if os.environ.get("KIMI_SHOW_WARNINGS") == "1":
        return
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _preflight(args) -> int:
    from megatron_kimi.platform.preflight import LaunchShape, check_launch, parse_gpus

    try:
        gpus = parse_gpus(args.gpus_per_node)
        visible = 0
        if gpus:
            import torch

            visible = torch.cuda.device_count()
        shape = LaunchShape(args.world, args.tasks_per_node or args.world, gpus, visible)
        overrides = eval_overrides(args.overrides) if args.target == "eval" else args.overrides
        print(check_launch(COMMANDS[args.target][0], args.config, overrides, shape))
    except ConfigError as e:
        print(f"megatron-kimi {args.target}: launch error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_kimi.platform import preemption

    preemption.install()  # first: Slurm's SIGUSR1 may come at any time; default action would kill us
    quiet_warnings()
    args = build_parser().parse_args(argv)
    if args.command == "preflight":
        return _preflight(args)
    schema, target, _ = COMMANDS[args.command]
    try:
        overrides = eval_overrides(args.overrides) if args.command == "eval" else args.overrides
        cfg = load_config(args.config, overrides, schema)
    except ConfigError as e:
        print(f"megatron-kimi {args.command}: config error: {e}", file=sys.stderr)
        return 2
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()  # no-op on CUDA machines; before Megatron is imported
    try:
        return int(_resolve(target)(cfg) or 0)
    except (ConfigError, ValueError) as e:
        print(f"megatron-kimi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
