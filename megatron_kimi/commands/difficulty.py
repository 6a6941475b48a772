"""``megatron-kimi difficulty CONFIG.yaml``: each RL prompt's difficulty, measured (Kimi k1.5 §2.3.4).

The paper rates a prompt by the pass rate of a model over several samples at temperature 1. This
command does that for every prompt of ``data.prompts`` with a checkpoint (the run's own latest, else
``checkpoint.load``, e.g. the SFT checkpoint; a random init has nothing to measure, so none is an error)
and writes them all to ``difficulty.output`` (default ``RUN_DIR/prompts_difficulty.jsonl``), each line
with its original fields plus ``"pass_rate"`` and ``"difficulty": 1 - pass_rate`` (in [0, 1], higher =
harder: what ``data.sampling: curriculum`` reads, rl/prompt_sampler.py). ``data.prompts`` itself is
never rewritten. ``builtin:arithmetic`` writes the run's 4000 training prompts (prompt, answer, kind).

The RL run's pieces are reused: the Megatron model (built as ``rl`` builds it, weights only from the
checkpoint), the built-in rollout engine on it, :class:`SampleGenerator` (``difficulty.samples`` samples
per prompt, per-request seeds; the prompts split over the data-parallel ranks) and the RL loop's
``score`` (on rank 0, ``data.reward`` or each prompt's kind). ``difficulty.batch_prompts`` prompts are
generated and scored at a time; rank 0 writes the file (atomically) and prints a one-line summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from megatron_kimi.config import ConfigError, RLConfig

DEFAULT_OUTPUT = "prompts_difficulty.jsonl"


def output_path(cfg: RLConfig) -> Path:
    return Path(cfg.difficulty.output) if cfg.difficulty.output else Path(cfg.run_dir) / DEFAULT_OUTPUT


def check(cfg: RLConfig) -> Tuple[Path, Path]:
    """Fail fast, before any process group or model: returns (the checkpoint, the output path)."""
    from megatron_kimi.commands.checkpoint_samples import check_not_input, start_checkpoint

    d = cfg.difficulty
    if d.samples < 1:
        raise ConfigError(f"difficulty.samples must be >= 1, got {d.samples}")
    if d.temperature < 0:
        raise ConfigError(f"difficulty.temperature must be >= 0, got {d.temperature}")
    if d.batch_prompts < 1:
        raise ConfigError(f"difficulty.batch_prompts must be >= 1, got {d.batch_prompts}")
    out = output_path(cfg)
    check_not_input(cfg, out, "difficulty.output")
    return start_checkpoint(cfg, "to measure"), out


def read_records(cfg: RLConfig, label: str = "difficulty") -> Tuple[List[dict], list]:
    """(the original JSON objects, their Prompts), line for line. Bad lines: ``data.on_error``."""
    from megatron_kimi.data.jsonl import BadLines, read_jsonl
    from megatron_kimi.rl.data import builtin_train_prompts, parse_prompt, with_image_dir
    from megatron_kimi.rl.images import absolute_image_refs

    prompts = builtin_train_prompts(cfg.data.prompts, cfg.training.seed)
    if prompts is not None:  # the RL run's training set (rl/data.py: load_prompt_sets)
        return [{"prompt": p.prompt, "answer": p.answer, "kind": p.kind,
                 **({"images": absolute_image_refs(p)} if p.images else {})} for p in prompts], prompts
    bad = BadLines(cfg.data.prompts)
    pairs = [v for _, v in read_jsonl(cfg.data.prompts, lambda obj: (obj, parse_prompt(obj, cfg.data.reward)),
                                      cfg.data.on_error, bad)]
    if bad.count:
        print(f"{label}: {bad.summary()} (left out of the output)", flush=True)
    if not pairs:
        raise ValueError(f"{cfg.data.prompts}: no prompts")
    prompts = with_image_dir([p for _, p in pairs], cfg.data.prompts)
    # written elsewhere, the records keep their images reachable
    return [{**o, "images": absolute_image_refs(p)} if p.images else o for o, p in pairs], prompts


def summary_line(pass_rates: List[float], out: Path, samples: int) -> str:
    n = len(pass_rates)
    hard = sum(r == 0.0 for r in pass_rates)
    easy = sum(r == 1.0 for r in pass_rates)
    mean = sum(pass_rates) / n
    return (f"difficulty: {n} prompts x {samples} samples, mean pass rate {mean:.3f}; difficulty 0 (always solved): "
            f"{easy}, in (0,1): {n - easy - hard}, 1 (never solved): {hard}; wrote {out}")


def run(cfg: RLConfig) -> int:
    start, out = check(cfg)
    records, prompts = read_records(cfg)

    from megatron_kimi.commands.checkpoint_samples import checkpoint_sampler
    from megatron_kimi.rl.loop import write_atomic

    d = cfg.difficulty
    with checkpoint_sampler(cfg, d.temperature, "difficulty") as sampler:
        if sampler.is_rank0:
            print(f"difficulty: {len(prompts)} prompts x {d.samples} samples at temperature {d.temperature} "
                  f"with {start}", flush=True)
        sampler.load(start)
        groups = sampler.scored(prompts, d.samples, d.batch_prompts)
        if sampler.is_rank0:
            pass_rates = [sum(bool(s.correct) for s in g) / d.samples for g in groups]
            lines = []
            for obj, rate in zip(records, pass_rates):
                row = dict(obj)
                row["difficulty"] = 1.0 - rate
                row["pass_rate"] = rate
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, "".join(lines))
            print(summary_line(pass_rates, out, d.samples), flush=True)
    return 0
