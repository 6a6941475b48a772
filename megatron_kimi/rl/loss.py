"""RL losses as a registry of pure functions over per-sequence log-probs.

Kimi k1.5 online mirror descent (§2.3): for each prompt x with k samples y_j from the reference
policy π_θi (the policy at the start of iteration i),

    L = (1/k) Σ_j ( r_j − r̄ − τ · log(π_θ(y_j|x) / π_θi(y_j|x)) )²,   r̄ = mean of the k rewards,

averaged over prompts (so: the mean over all samples), with log π summed over response tokens. Its
gradient is −2τ times the paper's eq. 3, (1/k) Σ_j [∇log π_θ(y_j)(r_j − r̄) − (τ/2)∇(log π_θ/π_θi)²],
so descending L ascends the paper's objective. There is no value network.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

LOSSES: Dict[str, Callable] = {}


def register_loss(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown RL loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


@register_loss("mirror_descent")
def mirror_descent_loss(logp_N: torch.Tensor, old_logp_N: torch.Tensor, adv_N: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample squared surrogate ``(adv − τ·(logp − old_logp))²`` with ``adv = r − r̄`` (shape [N]).

    The caller sums over the samples of the global batch and divides by their number.
    """
    return (adv_N - tau * (logp_N - old_logp_N)).pow(2)


@register_loss("policy_gradient")
def policy_gradient_loss(logp_N: torch.Tensor, old_logp_N: torch.Tensor, adv_N: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain REINFORCE with the mean-reward baseline (no KL term) — an ablation of the paper's loss."""
    return -adv_N * logp_N


def group_baseline(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """r − r̄ with r̄ the mean reward of each prompt's k samples (group_ids: prompt index per sample)."""
    groups, inverse = torch.unique(group_ids_N, return_inverse=True)
    sums = torch.zeros(len(groups), dtype=rewards_N.dtype).index_add_(0, inverse, rewards_N)
    counts = torch.zeros(len(groups), dtype=rewards_N.dtype).index_add_(0, inverse, torch.ones_like(rewards_N))
    return rewards_N - (sums / counts)[inverse]


def segment_sum(values_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum a packed [T] tensor over the segments cu_seqlens[i]:cu_seqlens[i+1] -> [n]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=values_T.device), lengths.to(values_T.device))
    out = torch.zeros(len(lengths), dtype=values_T.dtype, device=values_T.device)
    return out.index_add(0, seg, values_T[: int(cu_seqlens[-1])])
