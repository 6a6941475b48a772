"""Rank body of the vLLM-backend tests (module level so that spawn can import it; needs ``vllm``).

``vllm_job`` builds a tiny Megatron model on one spawned rank, starts a :class:`VllmBackend` on it
and runs every scenario, returning plain data; the tests compare it with the trainer's forward
(``forward_logits``, no cache: :func:`tests.rollout.bodies.reference_logprobs`).
"""

from __future__ import annotations

import torch

from tests.rollout import bodies

# head_dim 32 everywhere (vLLM's CPU attention has no 16).
MODELS = {
    # the demo's shape (2 layers, hidden 64, 2 heads: head_dim 32, tied embeddings) with RoPE
    "demo": ["model.num_layers=2", "model.num_attention_heads=2", "model.num_query_groups=2",
             "model.ffn_hidden_size=256", "model.tie_word_embeddings=true", "model.max_position_embeddings=160"],
    # Llama: GQA 4 heads / 2 KV groups over hidden 128, untied, another rotary base
    "llama": ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.tie_word_embeddings=false", "model.rotary_base=50000",
              "model.max_position_embeddings=160"],
    # Qwen2: q/k/v biases (given values), tied
    "qwen2": ["model.num_layers=2", "model.num_attention_heads=2", "model.num_query_groups=1",
              "model.add_qkv_bias=true", "model.tie_word_embeddings=true", "model.max_position_embeddings=160"],
}
MAX_SEQ = 160
MAX_NEW = 10
LONG_PROMPT = 140  # the shared prefix of the stale-prefix-cache check (> one 128-token block)


def _perturb(chunks, seed: float, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _max_diff(results, reference) -> float:
    return max(abs(a - b) for r, ref in zip(results, reference) for a, b in zip(r, ref))


def _processed_logprobs(chunks, prompt_list, outputs, temperature, top_k):
    """log_softmax of the trainer's logits / temperature restricted to the top-k, at each output token."""
    from megatron_kimi.training.lm_step import forward_logits

    full = [list(p) + list(o) for p, o in zip(prompt_list, outputs)]
    logits = forward_logits(chunks, [bodies._mb(s[:-1]) for s in full], max(len(s) for s in full))
    res = []
    for p, o, lg in zip(prompt_list, outputs, logits):
        lg = lg[0].float() / temperature
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lp = torch.log_softmax(lg.masked_fill(lg < kth, float("-inf")), -1)
        n = len(p)
        res.append([float(lp[n - 1 + j, t]) for j, t in enumerate(o)])
    return res


def vllm_job(rank, world_size, name):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.rollout import GenerationEngine, GenerationRequest, RolloutBackend, SamplingParams
    from megatron_kimi.rollout.vllm_backend import VllmBackend
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE

    overrides = MODELS[name]
    initialize(load_config(None, BASE + bodies.MODEL + overrides))
    cfg, chunks = bodies.build_model(overrides, bias_noise=name == "qwen2")
    P = bodies.prompts()
    out = {}

    def reqs(params_for):
        return [GenerationRequest(i, p, params_for(i)) for i, p in enumerate(P)]

    def lps(results):
        return [r.logprobs for r in results]

    backend = VllmBackend(chunks, cfg.model, max_seq_len=MAX_SEQ, max_batch_size=4, seed=0, sync_bucket_mb=0.05)
    out["is_backend"] = isinstance(backend, RolloutBackend)
    out["files"] = sorted(f.name for f in backend.dir.glob("*.safetensors"))
    out["start_s"] = backend.start_s
    try:
        # 1. greedy: the trainer's greedy path and log-probs
        greedy = backend.generate(reqs(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)))
        outs = [r.output_ids for r in greedy]
        out["greedy"] = outs
        out["greedy_finish"] = [r.finish_reason for r in greedy]
        out["greedy_slp"] = [r.sampling_logprobs for r in greedy]
        out["ref_greedy"] = bodies.reference_greedy(chunks, P, [MAX_NEW] * len(P))
        out["greedy_lp_diff"] = _max_diff(lps(greedy), bodies.reference_logprobs(chunks, P, outs))

        # 2. sampling: raw policy (temperature 1) and truncated (temperature, top-k, top-p)
        raw = backend.generate(reqs(lambda i: SamplingParams(max_new_tokens=MAX_NEW, seed=10 + i)))
        out["raw_slp"] = [r.sampling_logprobs for r in raw]
        out["raw_lp_diff"] = _max_diff(lps(raw), bodies.reference_logprobs(chunks, P, [r.output_ids for r in raw]))

        def trunc(i):
            return SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW, seed=100 + i)

        sampled = backend.generate(reqs(trunc))
        out["trunc_lp_diff"] = _max_diff(lps(sampled),
                                         bodies.reference_logprobs(chunks, P, [r.output_ids for r in sampled]))
        # the sampling log-probs: under temperature 0.7 and top-k 20 (renormalised)
        topk = backend.generate(reqs(lambda i: SamplingParams(temperature=0.7, top_k=20, max_new_tokens=MAX_NEW,
                                                              seed=200 + i)))
        out["topk_slp_diff"] = _max_diff([r.sampling_logprobs for r in topk],
                                         _processed_logprobs(chunks, P, [r.output_ids for r in topk], 0.7, 20))
        out["topk_lp_diff"] = _max_diff(lps(topk), bodies.reference_logprobs(chunks, P, [r.output_ids for r in topk]))
        out["trunc_same_again"] = [r.output_ids for r in backend.generate(reqs(trunc))] == \
            [r.output_ids for r in sampled]
        out["trunc_reversed"] = [r.output_ids for r in reversed(backend.generate(list(reversed(reqs(trunc)))))] == \
            [r.output_ids for r in sampled]
        out["seeds"] = [r.seed for r in sampled]

        # 3. finish reasons, against the built-in engine on the same weights
        stop_tok = outs[0][4]
        fin = [
            GenerationRequest("stop", P[0], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW,
                                                           stop_token_ids=[stop_tok])),
            GenerationRequest("len", P[1], SamplingParams(temperature=0.0, max_new_tokens=3)),
            GenerationRequest("rep", P[2], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW,
                                                          repeat_detector_factory=bodies.stop_after_4)),
            GenerationRequest("zero", P[4], SamplingParams(max_new_tokens=0)),
            GenerationRequest("cap", P[3], SamplingParams(temperature=0.0, max_new_tokens=1000)),
        ]
        builtin = GenerationEngine(chunks, max_batch_size=4, max_seq_len=MAX_SEQ)
        out["finish"] = [(r.output_ids, r.finish_reason) for r in backend.generate(fin)]
        out["finish_builtin"] = [(r.output_ids, r.finish_reason) for r in builtin.generate(fin)]
        try:
            backend.generate([GenerationRequest("s", P[0], SamplingParams(stop_strings=["x"]))])
        except ValueError as e:
            out["stop_strings_error"] = str(e)

        # 4. weight sync: perturbed trainer -> mismatch before the sync, match after
        fixed_out = outs  # fixed sequences: the greedy outputs above, scored teacher-forced
        _perturb(chunks, seed=1)
        ref_new = bodies.reference_logprobs(chunks, P, fixed_out)
        out["before_sync_diff"] = _max_diff(backend.score(P, fixed_out), ref_new)
        v0 = backend.weight_version
        backend.release()
        backend.resume()
        backend.update_weights(chunks)
        out["version_step"] = backend.weight_version - v0
        out["sync_s"], out["sync_gbps"], out["sync_bytes"] = (backend.last_sync_s, backend.last_sync_gbps,
                                                              backend.last_sync_bytes)
        out["after_sync_diff"] = _max_diff(backend.score(P, fixed_out), ref_new)
        after = backend.generate(reqs(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)))
        out["after_sync_greedy"] = [r.output_ids for r in after]
        out["after_sync_ref_greedy"] = bodies.reference_greedy(chunks, P, [MAX_NEW] * len(P))
        out["after_sync_greedy_diff"] = _max_diff(lps(after), bodies.reference_logprobs(
            chunks, P, [r.output_ids for r in after]))

        # 5. the prefix cache: a long prompt, cached under the old weights, then new weights
        g = torch.Generator().manual_seed(9)
        long = [torch.randint(0, 100, (LONG_PROMPT,), generator=g).tolist()]
        greedy1 = [GenerationRequest("long", long[0], SamplingParams(temperature=0.0, max_new_tokens=4))]
        backend.generate(greedy1)  # fills the prefix cache
        _perturb(chunks, seed=2)
        # reload without the reset (what update_weights does, minus reset_prefix_cache)
        backend.write_weights(chunks)
        backend.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(backend.dir)})
        stale = backend.generate(greedy1)
        out["stale_diff"] = _max_diff(lps(stale), bodies.reference_logprobs(chunks, long, [stale[0].output_ids]))
        backend.update_weights(chunks)  # the same weights, now with the reset
        fresh = backend.generate(greedy1)
        out["fresh_diff"] = _max_diff(lps(fresh), bodies.reference_logprobs(chunks, long, [fresh[0].output_ids]))
    finally:
        d = backend.dir
        backend.close()
        out["dir_removed"] = not d.exists()
    return out


def vllm_tp_job(rank, world_size, name):
    """The trainer at TP = ``world_size``: one engine on TP rank 0 fed by the collective export; every
    rank gets the same results, equal to the (TP-sharded) trainer's forward, before and after a sync
    of perturbed weights, and after the colocation wake-up order (weights, sync, KV cache)."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.rollout import GenerationRequest, SamplingParams
    from megatron_kimi.rollout.vllm_backend import VllmBackend
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE

    overrides = MODELS[name] + [f"parallel.tensor={world_size}"]
    initialize(load_config(None, BASE + bodies.MODEL + overrides))
    cfg, chunks = bodies.build_model(overrides, bias_noise=name == "qwen2")
    P = bodies.prompts()
    greedy = [GenerationRequest(i, p, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)) for i, p in enumerate(P)]
    backend = VllmBackend(chunks, cfg.model, max_seq_len=MAX_SEQ, max_batch_size=4, seed=0, sync_bucket_mb=0.05)
    out = {"leader": backend.llm is not None}
    try:
        res = backend.generate(greedy)
        out["greedy"] = [r.output_ids for r in res]
        out["ref_greedy"] = bodies.reference_greedy(chunks, P, [MAX_NEW] * len(P))
        out["lp_diff"] = _max_diff([r.logprobs for r in res], bodies.reference_logprobs(chunks, P, out["greedy"]))
        sampled = backend.generate([GenerationRequest(i, p, SamplingParams(max_new_tokens=MAX_NEW, seed=10 + i))
                                    for i, p in enumerate(P)])
        out["sampled"] = [r.output_ids for r in sampled]
        out["sampled_lp_diff"] = _max_diff([r.logprobs for r in sampled],
                                           bodies.reference_logprobs(chunks, P, out["sampled"]))
        # The same draws on every rank: replicated tensors (norms) must stay equal across the TP group.
        # (The shards themselves already differ: the first export above assembled them.)
        _perturb(chunks, seed=1)
        out["before_sync_diff"] = _max_diff(backend.score(P, out["greedy"]),
                                            bodies.reference_logprobs(chunks, P, out["greedy"]))
        backend.release()
        backend.resume(["weights"])
        backend.update_weights(chunks)
        backend.resume(["kv_cache"])
        after = backend.generate(greedy)
        out["after_greedy"] = [r.output_ids for r in after]
        out["after_ref_greedy"] = bodies.reference_greedy(chunks, P, [MAX_NEW] * len(P))
        out["after_lp_diff"] = _max_diff([r.logprobs for r in after],
                                         bodies.reference_logprobs(chunks, P, out["after_greedy"]))
        out["version"] = backend.weight_version
        out["sync_bytes"] = backend.last_sync_bytes
    finally:
        backend.close()
    return out


def vllm_compiled_job(rank, world_size, name):
    """``rollout.enforce_eager=false`` on CPU: vLLM compiles the model (inductor). A sync reloads the
    weights in place; the compiled graph must read the new values (weights are its inputs, not constants
    folded in), so greedy outputs and log-probs follow the trainer before and after a perturbed sync."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.rollout import GenerationRequest, SamplingParams
    from megatron_kimi.rollout.vllm_backend import VllmBackend
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE

    overrides = MODELS[name]
    initialize(load_config(None, BASE + bodies.MODEL + overrides))
    cfg, chunks = bodies.build_model(overrides, bias_noise=name == "qwen2")
    P = bodies.prompts()
    greedy = [GenerationRequest(i, p, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)) for i, p in enumerate(P)]
    backend = VllmBackend(chunks, cfg.model, max_seq_len=MAX_SEQ, max_batch_size=4, seed=0, enforce_eager=False)
    out = {"eager": backend.enforce_eager, "start_s": backend.start_s}
    try:
        for tag in ("before", "after"):
            if tag == "after":
                _perturb(chunks, seed=1)
                out["stale_diff"] = _max_diff(backend.score(P, out["before_greedy"]),
                                              bodies.reference_logprobs(chunks, P, out["before_greedy"]))
                backend.update_weights(chunks)
            res = backend.generate(greedy)
            out[f"{tag}_greedy"] = [r.output_ids for r in res]
            out[f"{tag}_ref_greedy"] = bodies.reference_greedy(chunks, P, [MAX_NEW] * len(P))
            out[f"{tag}_lp_diff"] = _max_diff([r.logprobs for r in res],
                                              bodies.reference_logprobs(chunks, P, out[f"{tag}_greedy"]))
    finally:
        backend.close()
    return out


def engine_cores_job(rank, world_size, tp, affinity):
    """:func:`cpu_engine_cores` on ``world_size`` ranks of one host at TP ``tp``, each rank pinned to
    ``affinity[rank]`` first (no vllm needed)."""
    import os

    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.rollout.vllm_backend import cpu_engine_cores
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE

    os.sched_setaffinity(0, affinity[rank])
    initialize(load_config(None, BASE + bodies.MODEL + [f"parallel.tensor={tp}"]))
    return cpu_engine_cores()
