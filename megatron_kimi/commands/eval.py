"""``megatron-kimi eval CONFIG.yaml [overrides] [CKPT ...]``: held-out accuracy against response length,
one row per checkpoint (the long2short trade-off, Kimi k1.5 Fig. 7).

The checkpoints: ``checkpoint.load`` (if set), then ``eval.checkpoints`` (a list; the CLI turns extra
positional arguments, those without ``=``, into it), in that order; with neither, the run's own latest.
Each is a checkpoint dir or a ``checkpoints/`` dir with a ``latest`` file.

The prompts are the RL run's held-out set (``data.eval_prompts``, else the built-in disjoint arithmetic
set, else the last ``data.eval_size`` prompts of ``data.prompts``: rl/data.py ``load_prompt_sets``), each
answered ``eval.samples`` times at ``eval.temperature`` (default: once, greedy, as the RL run's held-out
evaluation) and scored by the RL rewards; generation and scoring are ``difficulty``'s
(commands/checkpoint_samples.py), the weights of each checkpoint loaded in turn into one model.

Per checkpoint: accuracy (correct / samples), mean / p50 / p90 response tokens (numpy's linear
percentile), accuracy per 1k tokens (accuracy / (mean tokens / 1000)). Rank 0 prints them as a table and
writes, under ``eval.output_dir`` (default ``RUN_DIR``): ``eval.json`` (the rows), ``eval.csv`` (the
same), ``eval_samples.jsonl`` (every sample: checkpoint, prompt, answer, response, correct, tokens) and
the PNG ``eval.plot`` (default ``eval_accuracy_vs_length.png``): accuracy vs mean response tokens, one
labelled point per checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megatron_kimi.config import ConfigError, RLConfig

COLUMNS = ("label", "accuracy", "mean_tokens", "p50_tokens", "p90_tokens", "accuracy_per_1k_tokens", "samples")


def output_paths(cfg: RLConfig) -> Tuple[Path, Path]:
    """(the output dir, the PNG)."""
    out = Path(cfg.eval.output_dir) if cfg.eval.output_dir else Path(cfg.run_dir)
    return out, Path(cfg.eval.plot) if cfg.eval.plot else out / "eval_accuracy_vs_length.png"


def checkpoints(cfg: RLConfig) -> List[Tuple[str, Path]]:
    """(as given, the checkpoint dir) of every checkpoint to evaluate, in order."""
    from megatron_kimi.training.ckpt_paths import resolve

    given = ([cfg.checkpoint.load] if cfg.checkpoint.load else []) + list(cfg.eval.checkpoints)
    if not given:
        own = resolve(Path(cfg.run_dir) / "checkpoints")
        if own is None:
            raise ValueError(f"no checkpoint to evaluate (nothing in {Path(cfg.run_dir) / 'checkpoints'}, no "
                             "checkpoint.load, no eval.checkpoints); give checkpoint.load=CKPT and/or more "
                             "checkpoint paths after the overrides")
        given = [str(own)]
    out = []
    for g in given:
        found = resolve(g)
        if found is None:
            raise ValueError(f"eval: {g!r}: no checkpoint there")
        out.append((g, found))
    return out


def label(given: str, found: Path) -> str:
    """A short name for the plot and table: the checkpoint dir's parent dir (usually the run's
    ``checkpoints``, so the one above) and its name."""
    parent = found.parent.parent if found.parent.name == "checkpoints" else found.parent
    return f"{parent.name}/{found.name}" if parent.name else found.name


def metrics(correct: Sequence[bool], tokens: Sequence[int]) -> Dict[str, float]:
    import numpy as np

    t = np.asarray(tokens, dtype=float)
    acc = float(np.mean(np.asarray(correct, dtype=float)))
    mean = float(t.mean())
    return {"accuracy": acc, "mean_tokens": mean, "p50_tokens": float(np.percentile(t, 50)),
            "p90_tokens": float(np.percentile(t, 90)),
            "accuracy_per_1k_tokens": acc / (mean / 1000.0) if mean > 0 else float("nan"), "samples": len(t)}


def table(rows: Sequence[dict]) -> str:
    width = max([len("checkpoint")] + [len(r["label"]) for r in rows])
    head = f"{'checkpoint':<{width}}  accuracy  mean_tok  p50_tok  p90_tok  acc/1k_tok  samples"
    lines = [head] + [f"{r['label']:<{width}}  {r['accuracy']:8.4f}  {r['mean_tokens']:8.2f}  {r['p50_tokens']:7.1f}  "
                      f"{r['p90_tokens']:7.1f}  {r['accuracy_per_1k_tokens']:10.3f}  {r['samples']:7d}" for r in rows]
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys = [r["mean_tokens"] for r in rows], [r["accuracy"] for r in rows]
    ax.plot(xs, ys, "o")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy vs response length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check(cfg: RLConfig) -> List[Tuple[str, Path]]:
    e = cfg.eval
    if e.samples < 1:
        raise ConfigError(f"eval.samples must be >= 1, got {e.samples}")
    if e.temperature < 0:
        raise ConfigError(f"eval.temperature must be >= 0, got {e.temperature}")
    if e.batch_prompts < 1:
        raise ConfigError(f"eval.batch_prompts must be >= 1, got {e.batch_prompts}")
    return checkpoints(cfg)


def run(cfg: RLConfig) -> int:
    from megatron_kimi.commands.checkpoint_samples import checkpoint_sampler
    from megatron_kimi.rl.data import load_prompt_sets
    from megatron_kimi.rl.loop import write_atomic

    ckpts = check(cfg)
    e = cfg.eval
    out_dir, png = output_paths(cfg)
    with checkpoint_sampler(cfg, e.temperature, "eval") as sampler:
        _, prompts = load_prompt_sets(cfg)
        rows, per_sample = [], []
        for given, found in ckpts:
            if sampler.is_rank0:
                print(f"eval: {len(prompts)} held-out prompts x {e.samples} at temperature {e.temperature} "
                      f"with {found}", flush=True)
            sampler.load(found)
            groups = sampler.scored(prompts, e.samples, e.batch_prompts)
            if not sampler.is_rank0:
                continue
            samples = [(p, s) for p, g in zip(prompts, groups) for s in g]
            name = label(given, found)
            if any(r["label"] == name for r in rows):  # the same checkpoint twice, or two runs' same name
                name = f"{name} ({len(rows) + 1})"
            rows.append({"label": name, "checkpoint": given, "path": str(found),
                         **metrics([bool(s.correct) for _, s in samples], [s.response_length for _, s in samples])})
            per_sample += [{"checkpoint": name, "prompt": p.prompt, "answer": p.answer, "response": s.response,
                            "correct": bool(s.correct), "tokens": s.response_length} for p, s in samples]
        if sampler.is_rank0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(out_dir / "eval.json", json.dumps(rows, indent=1) + "\n")
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + ["checkpoint", "path"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            write_atomic(out_dir / "eval.csv", buf.getvalue())
            write_atomic(out_dir / "eval_samples.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_sample))
            plot(rows, png)
            print(table(rows), flush=True)
            print(f"eval: wrote {out_dir / 'eval.json'}, eval.csv, eval_samples.jsonl and {png}", flush=True)
    return 0
