"""The DPO losses and TRL's metrics against their closed forms (python floats) on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_kimi.dpo.loss import REPORT_FIELDS, dpo_loss, metrics, pair_logps, pair_report
from megatron_kimi.training.lm_step import REPORT_FIELDS as ALL_REPORT_FIELDS


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ref(pc, pr, rc, rr, beta, loss_type, eps):
    """One pair, straight from the papers: DPO (eps=0), cDPO (eps>0), IPO."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    else:
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


def _random_pairs(seed, n=17):
    g = torch.Generator().manual_seed(seed)
    # sums of log-probs of long responses: large and negative; the policy a little off the reference
    ref = -torch.rand(n, 2, generator=g, dtype=torch.float64) * 300
    pol = ref + torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    return pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)]


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_loss_and_rewards_match_the_closed_form(loss_type, beta, eps):
    pc, pr, rc, rr = _random_pairs(seed=int(beta * 10) + int(eps * 100))
    losses, cr, rrew = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    for i in range(len(pc)):
        want = _ref(float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]), beta, loss_type, eps)
        assert losses[i].item() == pytest.approx(want[0], rel=1e-12, abs=1e-12)
        assert cr[i].item() == pytest.approx(want[1], rel=1e-12, abs=1e-12)
        assert rrew[i].item() == pytest.approx(want[2], rel=1e-12, abs=1e-12)


def test_sigmoid_gradient_is_the_dpo_gradient():
    """∂L/∂π_c = −β·σ(−β·h) (1 − ε) + β·σ(β·h)·ε, and ∂L/∂π_r its negative."""
    pc, pr, rc, rr = _random_pairs(seed=3)
    beta, eps = 0.3, 0.1
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
    gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
    pc, pr = pc.detach(), pr.detach()
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        want = -beta * s(-beta * h) * (1 - eps) + beta * s(beta * h) * eps
        assert gc[i].item() == pytest.approx(want, rel=1e-10)
        assert gr[i].item() == pytest.approx(-want, rel=1e-10)


def test_ipo_averages_log_probs_per_response_token_as_trl():
    rng = random.Random(0)
    n = 6
    seq_logp = torch.tensor([-rng.uniform(1, 200) for _ in range(2 * n)], dtype=torch.float64)
    ref_logp = seq_logp + torch.tensor([rng.uniform(-2, 2) for _ in range(2 * n)], dtype=torch.float64)
    tokens = torch.tensor([float(rng.randint(1, 90)) for _ in range(2 * n)], dtype=torch.float64)
    c, r = pair_logps(seq_logp, tokens, "ipo")
    rc, rr = pair_logps(ref_logp, tokens, "ipo")
    losses, _, _ = dpo_loss(c, r, rc, rr, 0.2, "ipo")
    for i in range(n):
        avg = lambda v, j: float(v[j]) / float(tokens[j])  # noqa: E731
        want = _ref(avg(seq_logp, 2 * i), avg(seq_logp, 2 * i + 1), avg(ref_logp, 2 * i), avg(ref_logp, 2 * i + 1),
                    0.2, "ipo", 0.0)[0]
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
    c_sum, r_sum = pair_logps(seq_logp, tokens, "sigmoid")  # sigmoid: the sums, chosen at even positions
    assert torch.equal(c_sum, seq_logp[0::2]) and torch.equal(r_sum, seq_logp[1::2])


def test_metrics_are_trls_means_over_the_pairs_of_two_micro_batches():
    pc, pr, rc, rr = _random_pairs(seed=5, n=9)
    beta = 0.1
    parts = [slice(0, 4), slice(4, 9)]  # two micro-batches: the report is summed, then averaged
    total = sum(pair_report(*dpo_loss(pc[s], pr[s], rc[s], rr[s], beta), pc[s], pr[s]) for s in parts)
    assert len(total) == len(REPORT_FIELDS) and ALL_REPORT_FIELDS["dpo"] == REPORT_FIELDS
    got = metrics(total.tolist())
    ch = [beta * (float(pc[i]) - float(rc[i])) for i in range(9)]
    rj = [beta * (float(pr[i]) - float(rr[i])) for i in range(9)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert got["pairs"] == 9
    assert got["rewards/chosen"] == pytest.approx(mean(ch), rel=1e-12)
    assert got["rewards/rejected"] == pytest.approx(mean(rj), rel=1e-12)
    assert got["rewards/margins"] == pytest.approx(mean([a - b for a, b in zip(ch, rj)]), rel=1e-12)
    acc = mean([float(a > b) for a, b in zip(ch, rj)])
    assert 0 < acc < 1 and got["rewards/accuracies"] == pytest.approx(acc)
    assert got["logps/chosen"] == pytest.approx(mean([float(x) for x in pc]), rel=1e-12)
    assert got["logps/rejected"] == pytest.approx(mean([float(x) for x in pr]), rel=1e-12)
    losses = [_ref(float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]), beta, "sigmoid", 0.0)[0] for i in range(9)]
    assert total[0].item() / total[1].item() == pytest.approx(mean(losses), rel=1e-12)  # the step's loss


def test_at_the_reference_the_loss_is_log2_and_accuracy_zero():
    pc, pr, _, _ = _random_pairs(seed=7)
    losses, cr, rrew = dpo_loss(pc, pr, pc.clone(), pr.clone(), 0.1, "sigmoid")
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-15)
    assert metrics(pair_report(losses, cr, rrew, pc, pr).tolist())["rewards/accuracies"] == 0.0  # strict >, as TRL
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, pc, pr, 0.1, "hinge")
