"""The fused log-prob head (model/gpt.py) and the packed mirror-descent step (rl/batching.py) equal
Megatron's logits path: LM loss and grads at TP1, TP2, TP2+SP and PP2; the RL step (mirror descent on
per-token log-ratios, and the registry's policy-gradient loss on the fused head) and the reference
pass at TP1, TP2 and TP2+SP (the RL command refuses PP). fp32, one forward/backward on the same
weights and data per variant, on each rank."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

TAU = 0.1
LOSS_RTOL = 1e-6  # relative
GRAD_RTOL = 1e-5  # of each tensor's largest |grad|


def _set_head(model, impl):
    from megatron_kimi.model.sharding import unwrap

    for chunk in model:
        unwrap(chunk).lm_head_impl = impl


def _fwd_bwd(bundle, step_func, microbatches, seq_length, micro_batch_size, key):
    """One forward/backward (no optimizer step): the global report and this rank's main grads."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_kimi.training.trainer import global_report

    model = bundle.model
    for chunk in model:
        chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=[iter(microbatches) for _ in model] if len(model) > 1
        else iter(microbatches), model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    grads = {n: p.main_grad.detach().clone() for i, c in enumerate(model) for n, p in
             ((f"{i}.{n}", p) for n, p in c.named_parameters())}
    return global_report(reports, key), grads


def _rl_samples(vocab, n=7, seed=3):
    """Random prompt/response samples with per-token reference log-probs away from the policy's."""
    from megatron_kimi.rl.batching import loss_token_count
    from megatron_kimi.rl.types import Prompt, Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p_len, r_len = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        ids = torch.randint(1, vocab, (p_len + r_len,), generator=g).tolist()
        s = Sample(prompt_index=i // 2, prompt=Prompt("q"), prompt_ids=ids[:p_len], response_ids=ids[p_len:],
                   response="", sampler_logprobs=[0.0] * r_len, finish_reason="stop")
        s.ref_token_logp = -4.8 + 0.3 * torch.randn(loss_token_count(s), generator=g)
        s.ref_logp = float(s.ref_token_logp.double().sum())
        out.append(s)
    return out


def _body(rank, world_size, overrides, run_dir, with_rl):
    from megatron.core import parallel_state

    from megatron_kimi.rl.batching import make_rl_forward_step, pack_samples, reference_logprobs
    from megatron_kimi.training.lm_step import lm_forward_step
    from megatron_kimi.training.runtime import shutdown
    from tests.parallel.harness import setup_layout

    cfg, source, bundle, _trainer = setup_layout(overrides, run_dir, 1)
    t = cfg.training
    try:
        out = {"lm": {}, "rl": {}, "ref": {}}
        mbs = source.microbatches(0)
        for impl in ("megatron", "fused"):
            _set_head(bundle.model, impl)
            out["lm"][impl] = _fwd_bwd(bundle, lm_forward_step, mbs, t.seq_length, t.micro_batch_size, "lm_loss")
        if with_rl:
            samples = _rl_samples(bundle.vocab_size)
            adv = torch.randn(len(samples), generator=torch.Generator().manual_seed(5))
            dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            packs = pack_samples(samples, list(range(len(samples))), t.seq_length, 0, dp_rank, dp, adv)
            assert all("old_logp" in p for p in packs) and len(packs) >= 2
            for impl in ("megatron", "fused"):
                _set_head(bundle.model, impl)
                for loss in ("mirror_descent", "policy_gradient"):
                    out["rl"][(impl, loss)] = _fwd_bwd(bundle, make_rl_forward_step(loss, TAU, impl), packs,
                                                       t.seq_length, 1, "rl")
                out["ref"][impl] = reference_logprobs(bundle.model, pack_samples(
                    samples, list(range(len(samples))), t.seq_length, 0, dp_rank, dp, adv), samples, t.seq_length)
        return out
    finally:
        shutdown()


def _close_grads(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().item() or 1.0
        err = (a[name] - b[name]).abs().max().item() / scale
        assert err <= GRAD_RTOL, f"{what}: {name} grad differs by {err:.2e} of its max"


def _close(a: float, b: float, what: str, rtol: float = LOSS_RTOL) -> None:
    assert abs(a - b) <= rtol * max(abs(a), abs(b)), f"{what}: {a} vs {b}"


LAYOUTS = {
    "tp1": (1, [], True),
    "tp2": (2, ["parallel.tensor=2", "model.tie_word_embeddings=false"], True),
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"], True),
    "pp2": (2, ["parallel.pipeline=2"], False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fused_head_matches_megatron(name, tmp_path):
    world, overrides, with_rl = LAYOUTS[name]
    results = run_distributed(_body, world, overrides, str(tmp_path), with_rl, timeout=240)
    for rank, res in enumerate(results):
        (rep_m, g_m), (rep_f, g_f) = res["lm"]["megatron"], res["lm"]["fused"]
        assert rep_m[1] == rep_f[1] > 0  # loss tokens
        _close(rep_m[0], rep_f[0], f"{name} rank {rank} LM loss")
        _close_grads(g_m, g_f, f"{name} rank {rank} LM")
        if not with_rl:
            continue
        for loss in ("mirror_descent", "policy_gradient"):
            (rep_m, g_m), (rep_f, g_f) = res["rl"][("megatron", loss)], res["rl"][("fused", loss)]
            assert rep_m[1] == rep_f[1] == 7  # samples
            _close(rep_m[0], rep_f[0], f"{name} rank {rank} RL {loss} loss")
            _close(rep_m[2], rep_f[2], f"{name} rank {rank} RL {loss} log-ratio", 1e-5)
            assert abs(rep_m[2]) > 1.0  # the reference log-probs are away from the policy's: a real test
            _close_grads(g_m, g_f, f"{name} rank {rank} RL {loss}")
        (seq_m, tok_m), (seq_f, tok_f) = res["ref"]["megatron"], res["ref"]["fused"]
        torch.testing.assert_close(seq_f, seq_m, rtol=1e-6, atol=1e-5)
        for a, b in zip(tok_m, tok_f):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
        # the per-token log-probs are the ones summed into the per-sample ones, sample by sample
        torch.testing.assert_close(torch.stack([t.double().sum() for t in tok_f]), seq_f, rtol=1e-6, atol=1e-5)
