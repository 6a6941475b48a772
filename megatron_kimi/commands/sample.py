"""``megatron-kimi sample CONFIG.yaml``: shortest rejection sampling (long2short, Kimi k1.5 §2.4).

For every prompt of ``data.prompts`` (``builtin:arithmetic``: the run's 4000 training prompts), a
checkpoint (the run's own latest, else ``checkpoint.load``) generates ``sample.n`` samples at
``sample.temperature``, scored by the RL rewards (``data.reward`` or each prompt's kind). Two files:

* ``sample.output`` (default ``RUN_DIR/shortest.jsonl``): per prompt with at least one correct sample,
  the shortest correct one (fewest response tokens; the first on a tie) as an SFT chat example,
  ``{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]}``
  (what ``megatron-kimi sft`` reads, data/chat.py). Prompts without a correct sample are left out (counted).
* ``sample.samples_output`` (default ``RUN_DIR/samples.jsonl``): per prompt, every sample,
  ``{"prompt": PROMPT, "answer": ..., "samples": [{"response", "correct", "tokens"}, ...]}``, what
  ``megatron-kimi dpo`` reads with ``data.pairs_from=samples`` (dpo/data.py).

Generation and scoring are ``difficulty``'s (commands/checkpoint_samples.py). Rank 0 writes both files
(atomically) and prints the acceptance rate (prompts with a correct sample / all) and the mean response
tokens of all samples, of the correct ones and of the kept ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_kimi.config import ConfigError, RLConfig


def output_paths(cfg: RLConfig) -> Tuple[Path, Path]:
    s, run = cfg.sample, Path(cfg.run_dir)
    return (Path(s.output) if s.output else run / "shortest.jsonl",
            Path(s.samples_output) if s.samples_output else run / "samples.jsonl")


def check(cfg: RLConfig) -> Tuple[Path, Path, Path]:
    """Fail fast, before any process group or model: (the checkpoint, the SFT output, the samples output)."""
    from megatron_kimi.commands.checkpoint_samples import check_not_input, start_checkpoint

    s = cfg.sample
    if s.n < 1:
        raise ConfigError(f"sample.n must be >= 1, got {s.n}")
    if s.temperature < 0:
        raise ConfigError(f"sample.temperature must be >= 0, got {s.temperature}")
    if s.batch_prompts < 1:
        raise ConfigError(f"sample.batch_prompts must be >= 1, got {s.batch_prompts}")
    out, samples_out = output_paths(cfg)
    if out.resolve() == samples_out.resolve():
        raise ValueError(f"sample.output and sample.samples_output are the same file ({out})")
    check_not_input(cfg, out, "sample.output")
    check_not_input(cfg, samples_out, "sample.samples_output")
    return start_checkpoint(cfg, "to sample from"), out, samples_out


def shortest_correct(samples: Sequence[dict]) -> Optional[int]:
    """Index of the shortest correct sample (fewest ``tokens``; the first on a tie), None without one."""
    correct = [i for i, s in enumerate(samples) if s["correct"]]
    return min(correct, key=lambda i: (samples[i]["tokens"], i)) if correct else None


def select(rows: Sequence[dict]) -> Tuple[List[dict], Dict[str, float]]:
    """``rows``: the samples-file records. (the SFT examples, the summary numbers)."""
    sft, kept_tokens = [], []
    all_tokens = [s["tokens"] for r in rows for s in r["samples"]]
    correct_tokens = [s["tokens"] for r in rows for s in r["samples"] if s["correct"]]
    for r in rows:
        i = shortest_correct(r["samples"])
        if i is None:
            continue
        best = r["samples"][i]
        kept_tokens.append(best["tokens"])
        sft.append({"messages": [{"role": "user", "content": r.get("content", r["prompt"])},
                                 {"role": "assistant", "content": best["response"]}]})
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    stats = {"prompts": len(rows), "accepted": len(sft), "rejected": len(rows) - len(sft),
             "acceptance_rate": len(sft) / len(rows) if rows else float("nan"),
             "samples": len(all_tokens), "correct_samples": len(correct_tokens),
             "mean_tokens_all": mean(all_tokens), "mean_tokens_correct": mean(correct_tokens),
             "mean_tokens_kept": mean(kept_tokens)}
    return sft, stats


def summary_line(stats: Dict[str, float], out: Path, samples_out: Path) -> str:
    return (f"sample: acceptance rate {stats['acceptance_rate']:.3f} ({stats['accepted']}/{stats['prompts']} prompts "
            f"with a correct sample; {stats['rejected']} left out); mean response tokens: all "
            f"{stats['mean_tokens_all']:.2f} ({stats['samples']} samples), correct {stats['mean_tokens_correct']:.2f} "
            f"({stats['correct_samples']}), kept {stats['mean_tokens_kept']:.2f} ({stats['accepted']}); "
            f"wrote {out} and {samples_out}")


def run(cfg: RLConfig) -> int:
    from megatron_kimi.commands.checkpoint_samples import checkpoint_sampler
    from megatron_kimi.commands.difficulty import read_records
    from megatron_kimi.rl.images import user_content
    from megatron_kimi.rl.loop import write_atomic

    start, out, samples_out = check(cfg)
    _, prompts = read_records(cfg, "sample")
    s = cfg.sample
    with checkpoint_sampler(cfg, s.temperature, "sample") as sampler:
        if sampler.is_rank0:
            print(f"sample: {len(prompts)} prompts x {s.n} samples at temperature {s.temperature} with {start}",
                  flush=True)
        sampler.load(start)
        groups = sampler.scored(prompts, s.n, s.batch_prompts)
        if sampler.is_rank0:
            rows = [{"prompt": p.prompt, "answer": p.answer, **({"content": user_content(p)} if p.images else {}),
                     "samples": [{"response": x.response, "correct": bool(x.correct), "tokens": x.response_length}
                                 for x in g]} for p, g in zip(prompts, groups)]
            sft, stats = select(rows)
            dump = lambda objs: "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)  # noqa: E731
            for path, objs in ((samples_out, rows), (out, sft)):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, dump(objs))
            print(summary_line(stats, out, samples_out), flush=True)
    return 0
