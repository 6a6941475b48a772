"""Rank bodies for the DPO tests (module level so that spawn can import them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples/long2short/dpo.yaml"
PAIRS = ["data.pairs=examples/long2short/pairs_tiny.jsonl", "data.pairs_from=pairs"]


def packed_vs_alone(rank, world_size, run_dir):
    """Per-sequence log-probs of a pair's chosen and rejected (and of a second pair) packed together,
    each packed alone, and (control) the rejected in one attention segment with its chosen."""
    import os

    os.chdir(REPO)
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    import numpy as np
    import torch

    from megatron_kimi.commands.dpo import prepare_pairs
    from megatron_kimi.config import DPOConfig, load_config
    from megatron_kimi.data.packing import build_pack
    from megatron_kimi.data.sft_source import to_thd_batch
    from megatron_kimi.dpo.batching import _forward, build_pair_pack, fit_pairs, sequence_logps
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown

    cfg = load_config(str(CONFIG), [f"run_dir={run_dir}", *PAIRS], DPOConfig)
    ctx = initialize(cfg)
    try:
        tokenizer, pairs = prepare_pairs(cfg, ctx.is_rank0)
        view, _ = fit_pairs(pairs, cfg.training.seq_length)
        model = build_training_bundle(cfg, len(tokenizer), 1).model[0]
        cap, pad = cfg.training.seq_length, tokenizer.pad_token_id
        seq = view.pairs.seq_lengths
        p = int(np.argmax(seq[1::2][view.index] > 30))  # a pair with a long (worked) rejected answer
        q = next(k for k in range(len(view)) if k != p and view.lengths[k] + view.lengths[p] <= cap)

        @torch.no_grad()
        def logps(batch):
            out, packed, _ = _forward(model, batch)
            return sequence_logps(out, batch["loss_mask"], packed.cu_seqlens_q_padded)[0].tolist()

        class One:  # one sequence made of the pair's chosen then rejected, loss on the rejected response only
            def sample(self, i):
                c_ids, _ = view.sample(2 * p)
                r_ids, r_mask = view.sample(2 * p + 1)
                return np.concatenate([c_ids, r_ids]), np.concatenate([np.zeros_like(c_ids, dtype=np.uint8), r_mask])

        return {
            "together": logps(build_pair_pack(view, [p, q], cap, pad)),
            "chosen_alone": logps(to_thd_batch(build_pack(view, [2 * p], cap, pad))),
            "rejected_alone": logps(to_thd_batch(build_pack(view, [2 * p + 1], cap, pad))),
            "second_pair_alone": logps(build_pair_pack(view, [q], cap, pad)),
            "rejected_attending_chosen": logps(to_thd_batch(build_pack(One(), [0], cap, pad))),
        }
    finally:
        shutdown()
