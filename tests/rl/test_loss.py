"""The mirror-descent loss: value and gradient against the paper's formulas on random inputs."""

from __future__ import annotations

import torch

from megatron_kimi.rl.loss import get_loss, group_baseline, mirror_descent_loss, segment_sum


def _toy_policy(seed=0, k=6, n_prompts=3, steps=5, vocab=11):
    """A tiny softmax policy over token sequences: logits θ[t, v] per position."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(steps, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.randint(0, vocab, (n_prompts * k, steps), generator=g)
    lengths = torch.randint(1, steps + 1, (n_prompts * k,), generator=g)
    rewards = torch.randint(0, 2, (n_prompts * k,), generator=g).double()
    groups = torch.arange(n_prompts).repeat_interleave(k)
    return theta, ys, lengths, rewards, groups


def _seq_logp(theta, ys, lengths):
    logp_tok = torch.log_softmax(theta, -1).gather(1, ys.T).T  # [N, steps]
    mask = torch.arange(ys.shape[1])[None, :] < lengths[:, None]
    return (logp_tok * mask).sum(1)


def test_loss_value_matches_the_formula():
    theta, ys, lengths, rewards, groups = _toy_policy()
    tau, k = 0.3, 6
    logp = _seq_logp(theta, ys, lengths)
    old = logp.detach() + 0.1 * torch.randn(len(logp), dtype=torch.float64)
    adv = group_baseline(rewards, groups)
    ours = mirror_descent_loss(logp, old, adv, tau).mean()
    direct = 0.0
    for p in range(3):  # per prompt: (1/k) Σ_j (r_j − r̄ − τ log π/π_old)², then the mean over prompts
        idx = groups == p
        rbar = rewards[idx].mean()
        direct = direct + ((rewards[idx] - rbar - tau * (logp[idx] - old[idx])) ** 2).sum() / k
    assert torch.allclose(ours, direct / 3, rtol=1e-12)


def test_gradient_is_the_papers_eq3_up_to_minus_2tau():
    theta, ys, lengths, rewards, groups = _toy_policy(seed=1)
    tau, k, n_prompts = 0.2, 6, 3
    old = _seq_logp(theta, ys, lengths).detach() - 0.05
    adv = group_baseline(rewards, groups)
    loss = mirror_descent_loss(_seq_logp(theta, ys, lengths), old, adv, tau).mean()
    (g_loss,) = torch.autograd.grad(loss, theta)
    # eq. 3 per prompt: (1/k) Σ_j [∇log π(y_j) (r_j − r̄) − (τ/2) ∇(log π/π_old)²], averaged over prompts.
    logp = _seq_logp(theta, ys, lengths)
    eq3 = ((logp * adv.detach()) - tau / 2 * (logp - old) ** 2).sum() / k / n_prompts
    (g_eq3,) = torch.autograd.grad(eq3, theta)
    assert torch.allclose(g_loss, -2 * tau * g_eq3, rtol=1e-10, atol=1e-14)


def test_at_the_reference_policy_the_gradient_is_the_baseline_policy_gradient():
    theta, ys, lengths, rewards, groups = _toy_policy(seed=2)
    tau = 0.5
    logp = _seq_logp(theta, ys, lengths)
    adv = group_baseline(rewards, groups)
    (g,) = torch.autograd.grad(mirror_descent_loss(logp, logp.detach(), adv, tau).sum(), theta)
    (g_pg,) = torch.autograd.grad((-2 * tau * adv * _seq_logp(theta, ys, lengths)).sum(), theta)
    assert torch.allclose(g, g_pg, rtol=1e-10)


def test_group_baseline_and_segment_sum():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.allclose(group_baseline(r, gid), torch.tensor([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3]))
    v = torch.arange(10.0)
    assert segment_sum(v, torch.tensor([0, 3, 4, 10])).tolist() == [3.0, 3.0, 39.0]
    assert get_loss("mirror_descent") is mirror_descent_loss
