"""Packed (THD) == unpacked: no token attends across sample boundaries, RoPE restarts per sample."""

from __future__ import annotations

import torch

from tests.dist import run_distributed

LENGTHS = [5, 17, 9, 1]  # odd lengths, and a 1-token sample
PAD = 3  # padding tail of the pack (its own segment, loss 0)


def packed_vs_unpacked(rank, world_size, extra):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_kimi.config import load_config
    from megatron_kimi.model.builder import build_model_chunks, transformer_config
    from megatron_kimi.model.init import init_weights
    from megatron_kimi.training.runtime import initialize, shutdown
    from tests.parallel.harness import BASE

    cfg = load_config(None, BASE + ["model.num_layers=2"] + list(extra))
    initialize(cfg)
    try:
        tf = transformer_config(cfg.model, cfg.parallel, cfg.precision)
        (model,) = build_model_chunks(cfg.model, tf, 128)
        init_weights([model], seed=3, std=0.02, num_layers=2)
        gen = torch.Generator().manual_seed(0)
        samples = [torch.randint(8, 100, (n + 1,), generator=gen) for n in LENGTHS]  # n inputs + 1 label

        def grads():
            g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            return g

        # Unpacked: each sample alone, [1, L].
        alone = []
        for s in samples:
            tok, lab = s[:-1].unsqueeze(0), s[1:].unsqueeze(0)
            pos = torch.arange(tok.shape[1]).unsqueeze(0)
            loss = model(tok, pos, None, labels=lab).sum()
            loss.backward()
            alone.append(loss.item())
        g_alone = grads()

        # Packed: one [1, T] row, cu_seqlens over the samples + a padding segment.
        toks = torch.cat([s[:-1] for s in samples] + [torch.zeros(PAD, dtype=torch.long)]).unsqueeze(0)
        labs = torch.cat([s[1:] for s in samples] + [torch.zeros(PAD, dtype=torch.long)]).unsqueeze(0)
        bounds = [0]
        for n in LENGTHS + [PAD]:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        pos = torch.cat([torch.arange(n) for n in LENGTHS + [PAD]]).unsqueeze(0)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                 cu_seqlens_kv_padded=cu, max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
        per_token = model(toks, pos, None, labels=labs, packed_seq_params=params)[0]
        packed = [per_token[bounds[i]:bounds[i + 1]].sum() for i in range(len(LENGTHS))]
        torch.stack(packed).sum().backward()
        g_packed = grads()
        return {"alone": alone, "packed": [p.item() for p in packed], "g_alone": g_alone, "g_packed": g_packed}
    finally:
        shutdown()


def _check(res):
    for a, b in zip(res["alone"], res["packed"]):
        assert abs(a - b) <= 1e-5 * abs(a), (res["alone"], res["packed"])
    for ga, gb in zip(res["g_alone"], res["g_packed"]):
        scale = ga.abs().max().item() or 1.0
        assert (ga - gb).abs().max().item() <= 1e-5 * scale


def test_packed_equals_unpacked_loss_and_grads():
    _check(run_distributed(packed_vs_unpacked, 1, [], timeout=180)[0])


def test_packed_equals_unpacked_under_tp2():
    for res in run_distributed(packed_vs_unpacked, 2, ["parallel.tensor=2"], timeout=180):
        _check(res)
