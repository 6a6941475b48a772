"""The PNG of an RL run: mean reward, train and held-out accuracy, mean response length per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import List


def plot_curves(history: List[dict], path: Path, before: dict) -> None:
    """``history``: the per-iteration records; ``before``: the held-out evaluation before RL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("reward", "accuracy", "response_length_mean"),
                              ("mean reward", "train accuracy (sampled)", "mean response length")):
        ax.plot(its, [h[key] for h in history], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    evals = [{"iteration": 0, "eval_accuracy": before["accuracy"]}] + [h for h in history if "eval_accuracy" in h]
    axes[1].plot([h["iteration"] for h in evals], [h["eval_accuracy"] for h in evals], "o-", label="held-out (greedy)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
