"""Rollout engine: exact against the trainer's forward, TP=2 == TP=1, sampling and finish rules.

Two spawned jobs (module fixtures) run every scenario of :func:`tests.rollout.bodies.engine_job`:
one at TP=1 (1 rank) and one at TP=2 (2 ranks); the tests below only compare their results. The
references are the trainer's ``forward_logits`` (full forward over the growing sequence, no cache).
The sampler is also tested directly (no processes).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.rollout import bodies
from tests.rollout.bodies import MAX_BATCH, MAX_NEW, PROMPT_LENS

TOL = 1e-5  # fp32 logprobs


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(bodies.engine_job, 1, 1, True, False, timeout=240)[0]


@pytest.fixture(scope="module")
def tp2_ranks():
    return run_distributed(bodies.engine_job, 2, 2, True, True, timeout=240)


@pytest.fixture(scope="module")
def tp2(tp2_ranks):
    return tp2_ranks[0]


def _max_lp_diff(results, reference):
    diffs = [abs(a - b) for r, ref in zip(results, reference) for a, b in zip(r["lp"], ref)]
    assert diffs
    return max(diffs)


def _outs(results):
    return [r["out"] for r in results]


# --------------------------------------------------------------------------------------------
# exactness against the trainer's forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", ["tp1", "tp2"])
def test_greedy_equals_stepwise_full_forward(job, request):
    res = request.getfixturevalue(job)
    assert _outs(res["greedy"]) == res["ref_greedy"]
    assert [len(o) for o in _outs(res["greedy"])] == MAX_NEW
    assert all(r["finish"] == "length" for r in res["greedy"])
    assert len({t for o in _outs(res["greedy"]) for t in o}) > 20  # not a degenerate model
    assert _outs(res["ddp"]) == res["ref_greedy"]  # the trainer's DDP-wrapped chunks
    assert _outs(res["greedy_alt"]) == res["ref_greedy"]  # SDPA decode attention, F.linear GEMMs
    assert _max_lp_diff(res["greedy_alt"], res["ref_greedy_lp"]) <= TOL


def test_continuous_batching_is_exercised(tp1):
    st = tp1["stats"]["greedy"]
    assert len(PROMPT_LENS) > MAX_BATCH and st["max_active"] == MAX_BATCH
    assert st["prefill_calls"] >= 3  # newcomers admitted while others were decoding
    # static batches of MAX_BATCH would need sum over batches of the longest response - 1 steps
    static = sum(max(MAX_NEW[i:i + MAX_BATCH]) - 1 for i in range(0, len(MAX_NEW), MAX_BATCH))
    assert st["steps"] < static
    assert st["decode_tokens"] == sum(MAX_NEW) - len(MAX_NEW)  # the first token of each comes from its prefill
    assert st["generated_tokens"] == sum(MAX_NEW)
    assert tp1["cache_reused"]
    assert tp1["train_mode_restored"]


@pytest.mark.parametrize("job", ["tp1", "tp2"])
@pytest.mark.parametrize("kind", ["greedy", "sampled", "masked"])
def test_logprobs_match_trainer_log_softmax(job, kind, request):
    res = request.getfixturevalue(job)
    ref = res[{"greedy": "ref_greedy_lp", "sampled": "ref_sampled_lp", "masked": "ref_masked_lp"}[kind]]
    assert _max_lp_diff(res[kind], ref) <= TOL


def test_tied_output_layer_and_qkv_bias(tp1):
    assert _outs(tp1["variant"]) == tp1["ref_variant"]
    assert _max_lp_diff(tp1["variant"], tp1["ref_variant_lp"]) <= TOL


# --------------------------------------------------------------------------------------------
# tensor parallelism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["greedy", "sampled", "sampled_wide_reversed", "raw", "topk1", "finish",
                                  "eos", "masked", "noseed"])
def test_tp2_equals_tp1(tp1, tp2, kind):
    assert _outs(tp2[kind]) == _outs(tp1[kind])
    assert [r["finish"] for r in tp2[kind]] == [r["finish"] for r in tp1[kind]]
    diffs = [abs(a - b) for x, y in zip(tp1[kind], tp2[kind]) for a, b in zip(x["lp"], y["lp"])]
    assert max(diffs, default=0.0) <= TOL


def test_tp_ranks_agree_exactly(tp2_ranks):
    a, b = tp2_ranks
    for kind in ("greedy", "sampled", "raw", "finish", "noseed", "masked"):
        assert a[kind] == b[kind]  # tokens, logprobs (broadcast from TP rank 0), seeds


@pytest.mark.parametrize("job", ["tp1", "tp2"])
def test_release_frees_the_kv_cache_and_resume_restores_it(job, request):
    life = request.getfixturevalue(job)["lifecycle"]
    assert life["is_backend"]  # GenerationEngine implements rollout.backend.RolloutBackend
    assert life["freed"]  # no cache, and its K and V tensors are gone
    assert "resume() first" in life["generate_released"]
    # the protocol syncs weights before the KV cache wakes; here that is a no-op on the trainer's modules
    assert life["update_weights_released"] == "allowed"
    assert life["weights_only_no_cache"]
    assert life["restored"]  # the same slots and length again
    assert life["versions"] == 2
    assert life["after"] == life["before"]  # tokens and logprobs, exactly
    assert life["closed"]


def test_pipeline_parallel_is_refused(tp2):
    assert "pipeline-parallel generation is not supported" in tp2["errors"]["pp"]
    assert "exactly one model chunk" in tp2["errors"]["chunks"]


# --------------------------------------------------------------------------------------------
# sampling and finish reasons
# --------------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy(tp1):
    assert _outs(tp1["topk1"]) == _outs(tp1["greedy"])
    assert _max_lp_diff(tp1["topk1"], [r["lp"] for r in tp1["greedy"]]) <= TOL
    assert all(x == 0.0 for r in tp1["topk1"] for x in r["slp"])


def test_seeded_sampling_is_reproducible_and_batch_independent(tp1):
    by_id = {r["id"]: r for r in tp1["sampled_wide_reversed"]}  # 7 slots, reversed order
    for r in tp1["sampled"]:
        assert r["out"] == by_id[r["id"]]["out"]
        assert r["seed"] == 100 + r["id"]
    assert _outs(tp1["sampled"]) != _outs(tp1["greedy"])  # it does sample
    for r in tp1["sampled"]:  # truncated + tempered distribution: its own logprobs, <= 0
        assert len(r["slp"]) == len(r["out"]) and all(x <= 1e-6 for x in r["slp"])
    assert all(r["slp"] is None for r in tp1["raw"])  # raw policy: sampling logprobs = logprobs
    assert len({r["seed"] for r in tp1["noseed"]}) == len(tp1["noseed"])


def test_masked_vocab_never_samples_padding(tp1):
    assert all(t < 100 for o in _outs(tp1["masked"]) for t in o)


def test_finish_reasons(tp1):
    f = {r["id"]: r for r in tp1["finish"]}
    g0 = tp1["greedy"][0]["out"]
    stop_tok = tp1["stop_tok"]
    first = g0.index(stop_tok)
    assert f["stop"]["finish"] == "stop" and f["stop"]["out"] == g0[:first + 1]  # stop token included
    assert f["len"]["finish"] == "length" and f["len"]["out"] == tp1["greedy"][1]["out"][:4]
    assert f["rep"]["finish"] == "repeat" and len(f["rep"]["out"]) == 4
    assert f["rep2"]["finish"] in ("repeat", "length")
    if f["rep2"]["finish"] == "repeat":
        assert f["rep2"]["out"][-1] == f["rep2"]["out"][-2]
    else:
        assert len(f["rep2"]["out"]) == 40
    target = bodies.letters(g0[2:4])  # the stop string: first completed by token k of the greedy path
    k = next(k for k in range(1, len(g0) + 1) if target in bodies.letters(g0[:k]))
    assert f["str"]["finish"] == "stop" and f["str"]["out"] == g0[:k]
    assert f["zero"]["finish"] == "length" and f["zero"]["out"] == []
    assert f["one"]["finish"] == "length" and f["one"]["out"] == tp1["greedy"][5]["out"][:1]  # leaves at prefill
    assert f["cap"]["finish"] == "length" and len(f["cap"]["out"]) == 64 - PROMPT_LENS[3]  # max_seq_len
    eos = tp1["eos"][0]
    assert eos["finish"] == "stop" and eos["out"] == g0[:first + 1]


@pytest.mark.parametrize("job", ["tp1", "tp2"])
def test_on_result_streams_each_final_result_in_finish_order(job, request):
    res = request.getfixturevalue(job)
    st = res["streamed"]
    calls, final = st["calls"], {r["id"]: r for r in st["final"]}
    assert sorted(c["id"] for c in calls) == sorted(final)  # once per request
    assert _outs(st["final"]) == _outs(res["greedy"])  # streaming changes nothing
    assert _max_lp_diff(st["final"], [r["lp"] for r in res["greedy"]]) <= TOL
    for c in calls:  # what the callback saw is the final result (not changed afterwards)
        assert {k: c[k] for k in final[c["id"]]} == final[c["id"]]
        assert len(c["out"]) == MAX_NEW[c["id"]]  # called once finished, not before
    steps = [c["step"] for c in calls]
    assert steps == sorted(steps)  # in finish order
    order = [c["id"] for c in calls]
    # requests 0 (20 tokens) and 1 (5 tokens) start together: 1 is delivered while 0 still generates
    assert order.index(1) < order.index(0) and calls[order.index(1)]["step"] < calls[order.index(0)]["step"]
    assert steps[0] < st["steps"]  # the first callback came before the last decode step
    # a request with no room for a token is final at once, before any decode step
    assert res["finish_order"][0] == ("zero", 0)
    assert sorted(i for i, _ in res["finish_order"]) == sorted(r["id"] for r in res["finish"])


def test_invalid_requests_are_rejected(tp1):
    bad = tp1["bad"]
    assert "empty prompt" in bad["empty"]
    assert "does not fit" in bad["too_long"]
    assert "token ids" in bad["bad_token"]
    assert "top_p" in bad["top_p"]
    assert "decode callable" in bad["no_decode"]


def test_sampler_top_p_top_k_temperature():
    from megatron_kimi.rollout.sampling import sample_batch

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(3, 1)
    us = torch.linspace(0, 1, 2001)[:-1].tolist()
    counts = torch.zeros(3, 4)
    for u in us:
        tok, lp, slp = sample_batch(logits, [1.0, 1.0, 0.5], [0, 2, 0], [0.7, 1.0, 1.0], [u, u, u])
        counts[torch.arange(3), tok] += 1
        assert torch.allclose(lp, probs.log()[tok], atol=1e-6)  # raw-policy logprob
    freq = counts / len(us)
    # top_p=0.7: nucleus {1 (0.5), 3 (0.3)} renormalised
    assert torch.allclose(freq[0], torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]), atol=2e-3)
    # top_k=2: the same two tokens
    assert torch.allclose(freq[1], torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]), atol=2e-3)
    # temperature 0.5: p^2 renormalised
    sq = probs ** 2 / (probs ** 2).sum()
    assert torch.allclose(freq[2], sq, atol=2e-3)
    # greedy rows and sampling logprobs
    tok, lp, slp = sample_batch(logits[:2], [0.0, 1.0], [0, 2], [1.0, 1.0], [None, 0.99])
    assert tok.tolist() == [1, 3]
    assert slp[0] == 0.0 and abs(slp[1].item() - torch.log(torch.tensor(0.3 / 0.8)).item()) < 1e-6


def test_sampler_candidate_path_equals_full_sort(monkeypatch):
    """Truncated sampling over the top-c candidates == over a full stable sort (ties included)."""
    import megatron_kimi.rollout.sampling as sampling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 1000, generator=g) * 3
    logits[:, 500:600] = logits[:, 10:11]  # a block of exact ties
    logits[:5] = torch.round(logits[:5])  # rows full of ties
    for _ in range(50):
        us = torch.rand(32, generator=g).tolist()
        ks = torch.randint(0, 30, (32,), generator=g).tolist()
        ps = (torch.rand(32, generator=g) * 0.5 + 0.5).tolist()
        ts = (torch.rand(32, generator=g) + 0.3).tolist()
        monkeypatch.setattr(sampling, "_CANDIDATES", 64)
        a = sampling.sample_batch(logits, ts, ks, ps, us)
        monkeypatch.setattr(sampling, "_CANDIDATES", 10**9)
        b = sampling.sample_batch(logits, ts, ks, ps, us)
        assert torch.equal(a[0], b[0])
        assert torch.allclose(a[2], b[2], atol=1e-6)


@pytest.mark.gpu
def test_engine_on_cuda_matches_the_trainer_forward():
    """The same job on the GPU: the model, its norms and KV caches on CUDA; greedy == full forward."""
    res = run_distributed(bodies.engine_job, 1, 1, True, False, timeout=240)[0]
    assert res["device"] == "cuda"
    assert _outs(res["greedy"]) == res["ref_greedy"]
    assert _outs(res["ddp"]) == res["ref_greedy"]
    assert _max_lp_diff(res["greedy_alt"], res["ref_greedy_lp"]) <= 1e-4  # fp32, GPU reduction orders
