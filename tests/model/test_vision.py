"""The vision tower and the VLM (megatron_kimi/model/vision/): packing, isolation, gradients, freezing.

HF parity of the tower and the whole VLM is in tests/convert/test_vlm_conversion.py (through the
converter). Here, on spawned gloo ranks with a tiny random VLM (fp32):

* packing: the tower on several images at once == the tower on each image alone;
* permuting the images permutes the merged outputs;
* two packed text samples, each with its own image: changing one image changes only its own sample's
  logits (no attention across samples in the tower or in the LM);
* a text loss gives every tower and projector parameter a gradient; frozen parts get none and are not
  in the optimizer; a placeholder count that does not match the images is a clear error;
* TP=2 gives the TP=1 tower output and logits; CP=2 (every CP rank runs the whole tower, each splices
  its own placeholder positions) gives the CP=1 loss and tower gradients.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(300)

IMAGE_TOKEN = 120
GRIDS = [[1, 4, 6], [1, 2, 2], [1, 6, 4]]  # (t, h, w) in patches; merged tokens 6, 1, 6


def _model_section(model_extra=None, **vision):
    return {**(model_extra or {}),
            "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
            "vocab_size": 128, "tie_word_embeddings": False, "max_position_embeddings": 512,
            "vision": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2,
                       "position_grid_size": 8, "image_token_id": IMAGE_TOKEN, **vision}}


def _build(tp: int, cp: int = 1, model_extra=None, sp: bool = False, **vision):
    """Initialised chunks (layout-independent init: the same weights at TP1, TP2 and CP2)."""
    from megatron_kimi.config import TrainConfig, build_config
    from megatron_kimi.model.builder import build_model_chunks, padded_vocab_size, transformer_config
    from megatron_kimi.model.init import init_weights
    from megatron_kimi.training.runtime import initialize

    cfg = build_config(TrainConfig, {"model": _model_section(model_extra, **vision),
                                     "parallel": {"tensor": tp, "context": cp, "sequence_parallel": sp},
                                     "training": {"seq_length": 64, "micro_batch_size": 1, "global_batch_size": 1,
                                                  "steps": 1}})
    initialize(cfg)
    tf = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = build_model_chunks(cfg.model, tf, padded_vocab_size(128, cfg.model.make_vocab_size_divisible_by, tp))
    init_weights(chunks, seed=3, std=0.2, num_layers=2)
    return cfg, chunks


def _images(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    return torch.randn(int(grid.prod(-1).sum()), 3, 14, 14, generator=g), grid


def _split(pix, grid):
    sizes = grid.prod(-1).tolist()
    return list(torch.split(pix, sizes)), [grid[i:i + 1] for i in range(len(grid))]


def _two_samples(pix, grid):
    """A packed THD micro-batch of two samples: sample 0 has images 0+1, sample 1 has image 2."""
    from megatron.core.packed_seq_params import PackedSeqParams

    merged = (grid.prod(-1) // 4).tolist()
    g = torch.Generator().manual_seed(5)
    s0 = torch.randint(0, 100, (merged[0] + merged[1] + 7,), generator=g)
    s0[2:2 + merged[0]] = IMAGE_TOKEN
    s0[3 + merged[0]:3 + merged[0] + merged[1]] = IMAGE_TOKEN
    s1 = torch.randint(0, 100, (merged[2] + 5,), generator=g)
    s1[1:1 + merged[2]] = IMAGE_TOKEN
    tokens = torch.cat([s0, s1])[None]
    pos = torch.cat([torch.arange(len(s0)), torch.arange(len(s1))])[None]
    cu = torch.tensor([0, len(s0), len(s0) + len(s1)], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=len(s0),
                             max_seqlen_kv=len(s0))
    return tokens, pos, packed, len(s0)


def _full_logits(logits_BSV):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits_BSV)[..., :128]


def _isolation_body(rank, world_size):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.model.vision.vlm import ImageInputs
    from megatron_kimi.training.runtime import shutdown

    _, chunks = _build(world_size)
    model = chunks[0].eval()
    out = {}
    try:
        with torch.no_grad():
            pix, grid = _images(GRIDS)
            together = model.vision_model(pix, grid)
            alone = torch.cat([model.vision_model(p, g) for p, g in zip(*_split(pix, grid))])
            out["packed_vs_alone"] = (together - alone).abs().max().item()
            order = [2, 0, 1]
            pixs, grids = _split(pix, grid)
            permuted = model.vision_model(torch.cat([pixs[i] for i in order]), torch.cat([grids[i] for i in order]))
            rows = torch.split(together, (grid.prod(-1) // 4).tolist())
            out["permuted"] = (permuted - torch.cat([rows[i] for i in order])).abs().max().item()

            tokens, pos, packed, n0 = _two_samples(pix, grid)
            base = _full_logits(model(tokens, pos, None, packed_seq_params=packed, images=ImageInputs(pix, grid)))
            pix2 = pix.clone()
            pix2[-grid[-1].prod():] += 1.0  # the image of sample 1 only
            changed = _full_logits(model(tokens, pos, None, packed_seq_params=packed, images=ImageInputs(pix2, grid)))
            out["sample0_change"] = (changed[:, :n0] - base[:, :n0]).abs().max().item()
            out["sample1_change"] = (changed[:, n0:] - base[:, n0:]).abs().max().item()
            out["tower"] = together
            out["logits"] = base
            try:
                model(tokens[:, 3:], pos[:, 3:], None, images=ImageInputs(pix, grid))  # one placeholder less
            except ValueError as e:
                out["mismatch_error"] = str(e)
    finally:
        shutdown()
    return out


def test_packing_permutation_isolation_and_tp2():
    one = run_distributed(_isolation_body, 1)[0]
    assert one["packed_vs_alone"] < 1e-5
    assert one["permuted"] < 1e-5
    assert one["sample0_change"] == 0.0  # not a single bit: nothing of sample 1 reaches sample 0
    assert one["sample1_change"] > 1e-3
    assert "12 image placeholder tokens" in one["mismatch_error"]
    assert "give 13 merged features" in one["mismatch_error"]
    two = run_distributed(_isolation_body, 2)
    for r in two:
        torch.testing.assert_close(r["tower"], one["tower"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["logits"], one["logits"], atol=1e-4, rtol=1e-4)
        assert r["sample0_change"] == 0.0


def _grad_body(rank, world_size, vision):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import TrainConfig, build_config
    from megatron_kimi.model.sharding import unwrap
    from megatron_kimi.model.vision.vlm import ImageInputs, part_of
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown

    cfg = build_config(TrainConfig, {"model": _model_section(**vision),
                                     "training": {"seq_length": 64, "micro_batch_size": 1, "global_batch_size": 1,
                                                  "steps": 1}})
    initialize(cfg)
    try:
        bundle = build_training_bundle(cfg, vocab_size=128, total_steps=1)
        ddp = bundle.model[0]
        model = unwrap(ddp)
        in_optimizer = {id(p) for group in bundle.optimizer.param_groups for p in group["params"]}
        pix, grid = _images(GRIDS)
        tokens, pos, packed, _ = _two_samples(pix, grid)
        labels = torch.roll(tokens, -1, 1).clamp(max=99)  # a text loss on every position
        ddp.zero_grad_buffer()
        loss = ddp(tokens, pos, None, labels=labels, packed_seq_params=packed, images=ImageInputs(pix, grid)).sum()
        loss.backward()
        report = {}
        for name, p in model.named_parameters():
            g = getattr(p, "main_grad", None) if p.requires_grad else None
            report[name] = {"part": part_of(name), "requires_grad": p.requires_grad,
                            "grad_norm": None if g is None else g.float().norm().item(),
                            "in_optimizer": id(p) in in_optimizer}
        # Megatron's float16/fp32 optimizer holds the params themselves (fp32 here): identity is membership.
        return report
    finally:
        shutdown()


@pytest.mark.parametrize("freeze", [None, "freeze_tower", "freeze_lm"])
def test_gradients_and_freezing(freeze):
    vision = {freeze: True} if freeze else {}
    report = run_distributed(_grad_body, 1, vision)[0]
    frozen_part = {"freeze_tower": "tower", "freeze_lm": "lm"}.get(freeze)
    parts = {r["part"] for r in report.values()}
    assert parts == {"tower", "projector", "lm"}
    for name, r in report.items():
        if r["part"] == frozen_part:
            assert not r["requires_grad"] and not r["in_optimizer"], name
        else:
            assert r["requires_grad"] and r["in_optimizer"], name
            if r["part"] != "lm":  # every tower/projector tensor is reached from the text loss
                assert r["grad_norm"] is not None and r["grad_norm"] > 0, (name, r)


def _count_body(rank, world_size):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.model.flops import num_params
    from megatron_kimi.training.runtime import shutdown

    cfg, chunks = _build(1)
    try:
        return sum(p.numel() for p in chunks[0].parameters()), num_params(cfg.model, 128)
    finally:
        shutdown()


def test_parameter_count_includes_the_tower():
    """model/flops.py's count (the one MFU and the benchmarks use) against the built VLM."""
    built, counted = run_distributed(_count_body, 1)[0]
    assert built == counted


def _cp_body(rank, world_size, tp=1, sp=False):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    import torch.distributed as dist

    from megatron_kimi.model.vision.vlm import ImageInputs, placeholder_index
    from megatron_kimi.parallel.context import split_batch_for_cp
    from megatron_kimi.training.runtime import shutdown

    cp = world_size // tp
    _, chunks = _build(tp, cp=cp, sp=sp)
    model = chunks[0]
    try:
        pix, grid = _images(GRIDS)
        g = torch.Generator().manual_seed(8)
        s0, s1 = torch.randint(0, 100, (16,), generator=g), torch.randint(0, 100, (12,), generator=g)
        s0[1:7] = IMAGE_TOKEN  # image 0 (6 merged tokens) straddles the zig-zag chunks of sample 0
        s0[9] = IMAGE_TOKEN  # image 1
        s1[4:10] = IMAGE_TOKEN  # image 2
        tokens = torch.cat([s0, s1])[None]
        cu = torch.tensor([0, 16, 28], dtype=torch.int32)
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1).clamp(max=99),
                 "loss_mask": torch.ones(1, 28), "position_ids": torch.cat([torch.arange(16), torch.arange(12)])[None],
                 "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                      cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                                                      max_seqlen_q=16, max_seqlen_kv=16),
                 "images": ImageInputs(pix, grid, placeholder_index(tokens, IMAGE_TOKEN, 13))}
        mine = split_batch_for_cp(batch, cp, parallel_state.get_context_parallel_rank())
        ce = model(mine["tokens"], mine["position_ids"], None, labels=mine["labels"],
                   packed_seq_params=mine["packed_seq_params"], images=mine["images"])
        loss = (ce * mine["loss_mask"]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if n.startswith("vision") and p.grad is not None}
        if tp > 1:  # TP-sharded tensors differ per rank: compare the replicated ones
            grads = {n: g for n, g in grads.items() if "patch_embed" in n or "position_embedding" in n
                     or "norm" in n}
        if cp > 1:
            group = parallel_state.get_context_parallel_group()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=group)
            for t in grads.values():
                dist.all_reduce(t, group=group)
        return loss.item(), grads
    finally:
        shutdown()


@pytest.mark.parametrize("layout", ["cp2", "tp2_sp"])
def test_context_and_sequence_parallel_splice_their_own_positions(layout):
    """CP2: each CP rank splices its zig-zag share; TP2+SP: splice first, then the sequence split."""
    loss1, grads1 = run_distributed(_cp_body, 1)[0]
    kwargs = {"cp2": {}, "tp2_sp": {"tp": 2, "sp": True}}[layout]
    for loss2, grads2 in run_distributed(_cp_body, 2, *kwargs.values()):
        assert abs(loss2 - loss1) < 1e-4 * abs(loss1), (loss1, loss2)
        assert set(grads2) <= set(grads1) and len(grads2) > (20 if layout == "cp2" else 6)
        for name, g in grads2.items():
            torch.testing.assert_close(g, grads1[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _gpu_tower_body(rank, world_size):
    from megatron_kimi.training.runtime import shutdown

    _, chunks = _build(1)
    tower = chunks[0].vision_model
    out = {}
    try:
        pix, grid = _images(GRIDS)
        pix = pix.cuda().requires_grad_(True)
        cores = [layer.self_attention.core_attention for layer in tower.decoder.layers]
        for impl in ("ref", "triton"):
            for core in cores:
                core.impl = impl
            pix.grad = None
            y = tower(pix, grid)
            y.square().sum().backward()
            out[impl] = (y.detach().cpu(), pix.grad.detach().cpu())
        return out
    finally:
        shutdown()


@pytest.mark.gpu
def test_gpu_tower_triton_non_causal_matches_reference():
    """On CUDA the tower's non-causal packed attention through the Triton kernel == the SDPA reference."""
    out = run_distributed(_gpu_tower_body, 1)[0]
    torch.testing.assert_close(out["triton"][0], out["ref"][0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out["triton"][1], out["ref"][1], atol=2e-4, rtol=2e-4)
