"""Pair packs: two THD sequences per pair (chosen, rejected), prompt tokens out of the loss, and no attention
across sequences: a response's log-prob is the same packed with its pair (and another pair) or alone."""

from __future__ import annotations

import pytest
import torch

from megatron_kimi.data.tokenizer import load_tokenizer
from megatron_kimi.dpo.batching import build_pair_pack, fit_pairs
from megatron_kimi.dpo.data import tokenize_pairs
from tests.dist import run_distributed
from tests.dpo.bodies import REPO, packed_vs_alone


def test_pack_layout(tmp_path):
    tok = load_tokenizer("builtin:char", tmp_path)
    pairs = tokenize_pairs(REPO / "examples/long2short/pairs_tiny.jsonl", tok, "pairs")
    view, _ = fit_pairs(pairs, 128)
    ids = [0, 3, 4]
    cap = int(view.lengths[ids].sum()) + 5
    batch = build_pair_pack(view, ids, cap, tok.pad_token_id, reference=torch.randn(len(view), 2).double().numpy())
    cu = batch["packed_seq_params"].cu_seqlens_q
    assert len(cu) == 2 * len(ids) + 1  # one segment per sequence: chosen, rejected, chosen, rejected, ...
    assert batch["ref_logps"].shape == (3, 2) and batch["pair_index"].tolist() == ids
    mask, labels, pos = batch["loss_mask"][0], batch["labels"][0], batch["position_ids"][0]
    for s in range(2 * len(ids)):
        a, b = int(cu[s]), int(cu[s + 1])
        seq_ids, seq_mask = view.sample(2 * ids[s // 2] + s % 2)
        assert batch["tokens"][0, a:b].tolist() == seq_ids.tolist()
        assert pos[a] == 0 and pos[b - 1] == b - a - 1  # positions restart per sequence
        assert labels[b - 1] == tok.pad_token_id and mask[b - 1] == 0  # nothing predicted across the boundary
        # label t is token t+1: in the loss exactly where that token is a response token (prompt masked)
        assert mask[a:b - 1].tolist() == seq_mask[1:].astype(float).tolist()
        n_prompt = int(seq_mask.argmax())
        assert n_prompt > 3 and mask[a:a + n_prompt - 1].sum() == 0 and mask[a:b].sum() == seq_mask.sum()
    assert mask[int(cu[-1]):].sum() == 0  # padding


@pytest.fixture(scope="module")
def logps(tmp_path_factory):
    return run_distributed(packed_vs_alone, 1, str(tmp_path_factory.mktemp("pack")), timeout=240)[0]


def test_no_attention_across_the_pair(logps):
    chosen, rejected, c2, r2 = logps["together"]
    assert rejected == pytest.approx(logps["rejected_alone"][0], rel=1e-6, abs=1e-5)
    assert chosen == pytest.approx(logps["chosen_alone"][0], rel=1e-6, abs=1e-5)
    assert [c2, r2] == pytest.approx(logps["second_pair_alone"], rel=1e-6, abs=1e-5)
    # control: the same rejected response in one attention segment with its chosen gets another log-prob
    # (far outside the tolerance above, even on this untrained model)
    assert abs(logps["rejected_attending_chosen"][0] - rejected) > 1e-2
