"""DPO losses and metrics as pure functions of per-sequence log-probs (TRL's definitions and names).

For a pair (x, y_c, y_r) with policy log-probs π_c, π_r and frozen-reference log-probs ref_c, ref_r
(each the sum over the response tokens; IPO: the mean, see below)::

    h = (π_c − ref_c) − (π_r − ref_r)
    sigmoid: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)        (ε = label_smoothing; 0: the DPO paper, > 0: cDPO)
    ipo:     (h − 1/(2β))²                              (log-probs averaged per response token, as TRL's IPO)

The loss of a batch is the mean over its pairs. Metrics (TRL's names, means over the pairs):
``rewards/chosen`` = β·(π_c − ref_c), ``rewards/rejected`` = β·(π_r − ref_r), ``rewards/margins``
= their difference, ``rewards/accuracies`` = the fraction with chosen reward > rejected reward (strict:
0 at the start, where the policy is the reference), ``logps/chosen`` = π_c, ``logps/rejected`` = π_r
(per-token means under IPO, as TRL logs them).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

LOSS_TYPES: Tuple[str, ...] = ("sigmoid", "ipo")

# The per-micro-batch report (summed over micro-batches and DP ranks): one tensor, one all-reduce.
REPORT_FIELDS: Tuple[str, ...] = ("loss_sum", "loss_count", "chosen_rewards_sum", "rejected_rewards_sum",
                                  "accuracies_sum", "chosen_logps_sum", "rejected_logps_sum")


def pair_logps(seq_logp_S: torch.Tensor, seq_tokens_S: torch.Tensor, loss_type: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums of a pack (chosen, rejected, chosen, rejected, ...) -> (chosen [P],
    rejected [P]); for ``ipo`` divided by each sequence's response-token count (TRL's IPO averages)."""
    if loss_type == "ipo":
        seq_logp_S = seq_logp_S / seq_tokens_S.clamp(min=1).to(seq_logp_S.dtype)
    return seq_logp_S[0::2], seq_logp_S[1::2]


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [P] and the (detached) rewards β·(π − ref) of chosen and rejected [P]."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; known: {list(LOSS_TYPES)}")
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1.0 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_report(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """The sums of :data:`REPORT_FIELDS` over the pairs of a micro-batch (float64)."""
    d = lambda t: t.detach().double().sum()  # noqa: E731
    n = torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)
    return torch.stack([d(losses), n, d(chosen_rewards), d(rejected_rewards),
                        (chosen_rewards > rejected_rewards).double().sum(), d(chosen_logps), d(rejected_logps)])


def metrics(report: Dict[str, float] | Sequence[float]) -> Dict[str, float]:
    """A global report (by field name, or in :data:`REPORT_FIELDS` order) -> TRL's metric names (means
    over the pairs of the step) and ``pairs``."""
    if not isinstance(report, dict):
        report = dict(zip(REPORT_FIELDS, report))
    n = max(float(report["loss_count"]), 1.0)
    chosen, rejected = report["chosen_rewards_sum"] / n, report["rejected_rewards_sum"] / n
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": report["accuracies_sum"] / n,
        "logps/chosen": report["chosen_logps_sum"] / n,
        "logps/rejected": report["rejected_logps_sum"] / n,
        "pairs": int(round(float(report["loss_count"]))),
    }
