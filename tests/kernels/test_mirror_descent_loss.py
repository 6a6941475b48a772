"""kernels/mirror_descent_loss.py: packed mirror-descent loss (Triton vs torch) and the fused version
vs ``megatron_kimi.rl.loss.mirror_descent_loss`` on naive log_softmax log-probs."""

from __future__ import annotations

import pytest
import torch

from megatron_kimi.kernels.mirror_descent_loss import (
    fused_mirror_descent_loss,
    mirror_descent_loss_packed,
    mirror_descent_loss_packed_ref,
)
from megatron_kimi.rl.loss import mirror_descent_loss, segment_sum

# fp32 sums of up to 1000 terms in different orders (sequential blocks vs index_add): ~1e-6 relative.
TOL = dict(atol=1e-5, rtol=1e-5)
# the fused path adds the log-prob kernel's fp32 differences (see test_fused_logprob.py), amplified by
# the sequence sums and the square.
FUSED_TOL = dict(atol=1e-4, rtol=1e-4)


def _packed(lengths, tail=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(lengths)).cumsum(0)
    T = int(cu[-1]) + tail  # tokens past cu[-1] (padding) belong to no segment
    logp = -torch.rand(T, generator=g) * 3
    old = -torch.rand(T, generator=g) * 3
    mask = (torch.rand(T, generator=g) > 0.3).float()
    adv = torch.randn(len(lengths), generator=g)
    return logp, old, mask, cu, adv


def _fwd_bwd(fn, logp, old, mask, cu, adv, tau, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (logp, old, adv)]
    loss = fn(leaves[0], leaves[1], mask, cu, leaves[2], tau, **kw)
    g = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device)
    (loss * g).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("lengths,tail", [([1, 17, 0, 1000], 5), ([3], 0), ([0, 0], 2), ([2500, 1, 7], 0)])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_packed_matches_reference(lengths, tail, tau):
    args = _packed(lengths, tail)
    got = _fwd_bwd(mirror_descent_loss_packed, *args, tau, backend="triton")
    want = _fwd_bwd(mirror_descent_loss_packed_ref, *args, tau)
    for name, a, b in zip(("loss", "d_logp", "d_old_logp", "d_adv"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    logp, old, mask, cu, adv = args
    assert torch.all(got[1][int(cu[-1]):] == 0) and torch.all(got[1][mask == 0] == 0)


def test_reference_is_the_rl_loss_on_segment_sums():
    logp, old, mask, cu, adv = _packed([1, 17, 0, 40], 3)
    want = mirror_descent_loss(segment_sum(mask * logp, cu), segment_sum(mask * old, cu), adv, 0.3)
    torch.testing.assert_close(mirror_descent_loss_packed_ref(logp, old, mask, cu, adv, 0.3), want, **TOL)
    # a zero-length segment: loss = adv²; a list of offsets and a bool mask are accepted too
    got = mirror_descent_loss_packed(logp, old, mask.bool(), cu.tolist(), adv, 0.3, backend="triton")
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got[2], adv[2] ** 2)


def test_no_segments_and_validation():
    empty = mirror_descent_loss_packed(torch.zeros(4), torch.zeros(4), torch.ones(4), [0], torch.zeros(0), 1.0,
                                       backend="triton")
    assert empty.shape == (0,)
    logp, old, mask, cu, adv = _packed([3, 4])
    with pytest.raises(ValueError, match="non-decreasing"):
        mirror_descent_loss_packed(logp, old, mask, [0, 5, 3], adv, 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        mirror_descent_loss_packed(logp, old, mask, [0, 3, 99], adv, 1.0)
    with pytest.raises(ValueError, match="adv_N"):
        mirror_descent_loss_packed(logp, old, mask, cu, adv[:1], 1.0)
    with pytest.raises(ValueError, match="equal"):
        mirror_descent_loss_packed(logp, old[:3], mask, cu, adv, 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_matches_rl_loss_on_naive_logprobs(backend):
    g = torch.Generator().manual_seed(7)
    lengths, tail, H, V, tau, temperature = [1, 17, 0, 45], 3, 32, 257, 0.5, 0.9
    cu = torch.tensor([0] + lengths).cumsum(0)
    T = int(cu[-1]) + tail
    hidden = torch.randn(T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (T,), generator=g)
    mask = (torch.rand(T, generator=g) > 0.25).float()
    old = -torch.rand(T, generator=g) * 6
    adv = torch.randn(len(lengths), generator=g)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, logp_T, ent_T = fused_mirror_descent_loss(h1, w1, labels, old, mask, cu, adv, tau,
                                                    temperature=temperature, token_block=16, vocab_chunk=64,
                                                    backend=backend)
    loss.sum().backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    naive_TV = torch.log_softmax(h2 @ w2.t() / temperature, dim=-1)
    naive_T = naive_TV.gather(1, labels[:, None])[:, 0]
    want = mirror_descent_loss(segment_sum(mask * naive_T, cu), segment_sum(mask * old, cu), adv, tau)
    want.sum().backward()

    torch.testing.assert_close(loss, want.detach(), **FUSED_TOL)
    torch.testing.assert_close(logp_T.detach(), naive_T.detach(), **FUSED_TOL)
    torch.testing.assert_close(ent_T.detach(), -(naive_TV.exp() * naive_TV).sum(-1).detach(), **FUSED_TOL)
    torch.testing.assert_close(h1.grad, h2.grad, **FUSED_TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **FUSED_TOL)


@pytest.mark.gpu
def test_gpu_packed_matches_reference():
    logp, old, mask, cu, adv = (t.cuda() for t in _packed([1, 17, 0, 5000, 33], 9))
    got = _fwd_bwd(mirror_descent_loss_packed, logp, old, mask, cu, adv, 0.2, backend="triton")
    want = _fwd_bwd(mirror_descent_loss_packed_ref, logp, old, mask, cu, adv, 0.2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
