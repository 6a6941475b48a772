"""Rank bodies for the rollout-engine tests (module level so that spawn can import them).

``engine_job`` runs every generation scenario at one tensor-parallel size and returns plain data;
the tests compare it with the trainer's forward (``forward_logits``, no cache) and across TP sizes.
"""

from __future__ import annotations

import torch

# The tiny model of tests/parallel/harness.py (GQA 4 heads / 2 KV groups, head_dim 16), with a
# larger init std (0.1, not 0.02) so that the logits are spread (logit std ~0.8: greedy paths far from
# ties, varied outputs) while fp32 round-off stays ~1e-6 in the logprobs.
MODEL = [
    "model.max_position_embeddings=96",
    "model.init_method_std=0.1",
    "model.tie_word_embeddings=false",
    "model.vocab_size=100",  # padded to 128: padded rows exist (and get random weights)
]
PROMPT_LENS = [3, 11, 5, 17, 1, 8, 13]
MAX_NEW = [20, 5, 12, 9, 16, 3, 14]  # different lengths: slots free up at different steps
MAX_BATCH = 3  # < number of requests: continuous batching (admissions while others decode)
PADDED_VOCAB = 128


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 100, (n,), generator=g).tolist() for n in PROMPT_LENS]


class RepeatAfter:
    """Stops once the same token has been produced ``n`` times in a row (module level: picklable)."""

    def __init__(self, n: int = 2):
        self.n, self.last, self.run = n, None, 0

    def update(self, tok: int) -> bool:
        self.run = self.run + 1 if tok == self.last else 1
        self.last = tok
        return self.run >= self.n


class StopAfter:
    """A repeat detector that fires at the ``n``-th token (deterministic finish-reason check)."""

    def __init__(self, n: int):
        self.n, self.count = n, 0

    def update(self, tok: int) -> bool:
        self.count += 1
        return self.count >= self.n


def stop_after_4():
    return StopAfter(4)


def letters(ids):
    return "".join(chr(ord("a") + t % 26) for t in ids)


def build_model(overrides, seed=3, bias_noise=False):
    from megatron_kimi.config import load_config
    from megatron_kimi.model.builder import build_model_chunks, transformer_config
    from megatron_kimi.model.init import init_weights
    from tests.parallel.harness import BASE

    cfg = load_config(None, BASE + MODEL + list(overrides))
    tf = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = build_model_chunks(cfg.model, tf, PADDED_VOCAB)
    init_weights(chunks, seed=seed, std=cfg.model.init_method_std, num_layers=cfg.model.num_layers)
    if bias_noise:  # init sets biases to 0: give them values so the bias path matters (TP=1 only)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return cfg, chunks


def _mb(seq):
    t = torch.tensor(seq, dtype=torch.long).unsqueeze(0)
    return {"tokens": t, "position_ids": torch.arange(t.shape[1]).unsqueeze(0)}


def reference_greedy(chunks, prompt_list, max_new):
    """Greedy decoding by full forwards over the growing sequences (no cache), all requests per step."""
    from megatron_kimi.training.lm_step import forward_logits

    seqs = [list(p) for p in prompt_list]
    outs = [[] for _ in prompt_list]
    for step in range(max(max_new)):
        live = [i for i in range(len(seqs)) if len(outs[i]) < max_new[i]]
        logits = forward_logits(chunks, [_mb(seqs[i]) for i in live], max(len(seqs[i]) for i in live))
        for i, lg in zip(live, logits):
            tok = int(lg[0, -1].float().argmax())
            outs[i].append(tok)
            seqs[i].append(tok)
    return outs


def reference_logprobs(chunks, prompt_list, outputs, vocab_size=None):
    """log_softmax of the trainer's forward over prompt + output, at each output token."""
    from megatron_kimi.training.lm_step import forward_logits

    full = [list(p) + list(o) for p, o in zip(prompt_list, outputs)]
    logits = forward_logits(chunks, [_mb(s[:-1]) for s in full], max(len(s) for s in full))
    res = []
    for p, o, lg in zip(prompt_list, outputs, logits):
        lg = lg[0].float()
        if vocab_size is not None:
            lg[:, vocab_size:] = float("-inf")
        lp = torch.log_softmax(lg, -1)
        n = len(p)
        res.append([float(lp[n - 1 + j, t]) for j, t in enumerate(o)])
    return res


def _requests(params_for):
    from megatron_kimi.rollout import GenerationRequest

    return [GenerationRequest(i, p, params_for(i)) for i, p in enumerate(prompts())]


def _pack(results):
    return [dict(id=r.request_id, out=r.output_ids, lp=r.logprobs, slp=r.sampling_logprobs,
                 finish=r.finish_reason, seed=r.seed) for r in results]


def _release_and_resume(engine, chunks):
    import gc
    import weakref

    from megatron_kimi.rollout import RolloutBackend, SamplingParams

    def greedy():
        return _pack(engine.generate(_requests(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW[i],
                                                                        seed=i))))

    out = {"is_backend": isinstance(engine, RolloutBackend), "before": greedy()}
    cache = engine.cache
    shape, nbytes = tuple(cache.k.shape), cache.nbytes
    refs = [weakref.ref(cache.k), weakref.ref(cache.v)]
    del cache
    engine.release()
    gc.collect()
    out["freed"] = engine.cache is None and all(r() is None for r in refs)
    for name, call in (("generate", greedy), ("update_weights", lambda: engine.update_weights(chunks))):
        try:
            call()
            out[f"{name}_released"] = "allowed"
        except AssertionError as e:
            out[f"{name}_released"] = str(e)
    engine.resume(["weights"])  # the trainer's weights are the engine's: nothing to wake, no cache yet
    out["weights_only_no_cache"] = engine.cache is None and engine.released
    engine.resume(["kv_cache"])
    out["restored"] = engine.cache is not None and (tuple(engine.cache.k.shape), engine.cache.nbytes) == (shape, nbytes)
    engine.update_weights(chunks)  # a no-op: the engine runs the trainer's modules
    out["versions"] = engine.weight_version
    out["after"] = greedy()
    engine.close()
    out["closed"] = engine.cache is None
    return out


def engine_job(rank, world_size, tp, with_reference=True, with_pp_check=False):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.rollout import GenerationEngine, GenerationRequest, SamplingParams
    from megatron_kimi.training.runtime import initialize, shutdown
    from tests.parallel.harness import BASE

    overrides = [f"parallel.tensor={tp}"]
    initialize(load_config(None, BASE + MODEL + overrides))
    try:
        cfg, chunks = build_model(overrides)
        model = chunks[0]
        model.train()
        P = prompts()
        out = {"stats": {}, "device": next(model.parameters()).device.type}
        engine = GenerationEngine(chunks, max_batch_size=MAX_BATCH, max_seq_len=64, eos_token_id=None,
                                  decode=letters)

        # 1. greedy, continuous batching (3 slots, 7 requests, different lengths)
        greedy = engine.generate(_requests(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW[i])))
        out["greedy"] = _pack(greedy)
        out["stats"]["greedy"] = vars(engine.stats).copy()
        out["train_mode_restored"] = model.training
        # the same, streamed: on_result gets each result when it is final (a copy taken then, and the
        # decode steps done so far)
        streamed = []

        def on_result(res):
            streamed.append(dict(_pack([res])[0], out=list(res.output_ids), lp=list(res.logprobs),
                                 step=engine.stats.steps))

        final = engine.generate(_requests(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW[i])),
                                on_result=on_result)
        out["streamed"] = {"calls": streamed, "final": _pack(final), "steps": engine.stats.steps}
        # the other CPU code paths: SDPA decode attention and F.linear GEMMs (auto: bmm / W @ x.T)
        alt = GenerationEngine(chunks, max_batch_size=MAX_BATCH, max_seq_len=64, decode_attention="sdpa")
        alt.runner.small_rows = 0
        out["greedy_alt"] = _pack(alt.generate(_requests(lambda i: SamplingParams(temperature=0.0,
                                                                                  max_new_tokens=MAX_NEW[i]))))
        # the cache is allocated once and reused
        cache_id = id(engine.cache.k)

        # 2. sampling with seeds (temperature, top-k, top-p), twice with other batching / order
        def sp(i):
            return SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW[i], seed=100 + i)

        sampled = engine.generate(_requests(sp))
        out["sampled"] = _pack(sampled)
        out["cache_reused"] = id(engine.cache.k) == cache_id
        wide = GenerationEngine(chunks, max_batch_size=7, max_seq_len=64)
        rev = list(reversed(_requests(sp)))
        out["sampled_wide_reversed"] = _pack(wide.generate(rev))
        # temperature 1, no truncation: raw policy (sampling_logprobs None)
        out["raw"] = _pack(engine.generate(_requests(lambda i: SamplingParams(max_new_tokens=MAX_NEW[i], seed=7 + i))))

        # 3. top_k=1 == greedy (any temperature)
        out["topk1"] = _pack(engine.generate(_requests(
            lambda i: SamplingParams(temperature=0.7, top_k=1, max_new_tokens=MAX_NEW[i], seed=i))))

        # 4. finish reasons
        g0 = greedy[0].output_ids
        stop_tok = g0[5]
        reqs = [
            GenerationRequest("stop", P[0], SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[stop_tok])),
            GenerationRequest("len", P[1], SamplingParams(temperature=0.0, max_new_tokens=4)),
            GenerationRequest("rep", P[2], SamplingParams(temperature=0.0, max_new_tokens=20,
                                                          repeat_detector_factory=stop_after_4)),
            GenerationRequest("rep2", P[3], SamplingParams(temperature=1.0, max_new_tokens=40, seed=1,
                                                           repeat_detector_factory=RepeatAfter)),
            GenerationRequest("str", P[0], SamplingParams(temperature=0.0, max_new_tokens=20,
                                                          stop_strings=[letters(g0[2:4])])),
            GenerationRequest("zero", P[4], SamplingParams(max_new_tokens=0)),
            GenerationRequest("one", P[5], SamplingParams(temperature=0.0, max_new_tokens=1)),
            GenerationRequest("cap", P[3], SamplingParams(temperature=0.0, max_new_tokens=1000)),
        ]
        finish_order = []
        out["finish"] = _pack(engine.generate(reqs, on_result=lambda r: finish_order.append(
            (r.request_id, engine.stats.steps))))
        out["finish_order"] = finish_order
        out["stop_tok"] = stop_tok
        eos_engine = GenerationEngine(chunks, max_batch_size=2, max_seq_len=64, eos_token_id=stop_tok)
        out["eos"] = _pack(eos_engine.generate([GenerationRequest("eos", P[0], SamplingParams(temperature=0.0))]))
        # masking the padded vocabulary
        masked = GenerationEngine(chunks, max_batch_size=4, max_seq_len=64, vocab_size=100)
        out["masked"] = _pack(masked.generate(_requests(lambda i: SamplingParams(temperature=1.5, max_new_tokens=MAX_NEW[i], seed=i))))
        # seed=None: drawn (and identical over TP ranks)
        out["noseed"] = _pack(engine.generate(_requests(lambda i: SamplingParams(max_new_tokens=3))))

        # input validation
        bad = {}
        for name, req, eng in (
                ("empty", GenerationRequest("e", [], SamplingParams()), engine),
                ("too_long", GenerationRequest("l", [1] * 64, SamplingParams()), engine),
                ("bad_token", GenerationRequest("t", [1, PADDED_VOCAB], SamplingParams()), engine),
                ("top_p", GenerationRequest("p", [1], SamplingParams(top_p=0.0)), engine),
                ("no_decode", GenerationRequest("s", [1], SamplingParams(stop_strings=["x"])), wide)):
            try:
                eng.generate([req])
            except ValueError as e:
                bad[name] = str(e)
        out["bad"] = bad

        # 5. the RolloutBackend lifecycle: release() frees the KV cache, resume() restores it
        out["lifecycle"] = _release_and_resume(engine, chunks)

        if with_reference:
            out["ref_greedy"] = reference_greedy(chunks, P, MAX_NEW)
            out["ref_greedy_lp"] = reference_logprobs(chunks, P, [r.output_ids for r in greedy])
            out["ref_sampled_lp"] = reference_logprobs(chunks, P, [r.output_ids for r in sampled])
            out["ref_masked_lp"] = reference_logprobs(chunks, P, [r["out"] for r in out["masked"]], vocab_size=100)

        # the trainer's wrapped model chunks (Megatron DDP) work as they are
        from megatron_kimi.model.builder import transformer_config, wrap_for_training

        wrapped = wrap_for_training(chunks, transformer_config(cfg.model, cfg.parallel, cfg.precision),
                                    cfg.parallel, cfg.precision)
        ddp_engine = GenerationEngine(wrapped, max_batch_size=MAX_BATCH, max_seq_len=64)
        out["ddp"] = _pack(ddp_engine.generate(_requests(lambda i: SamplingParams(temperature=0.0,
                                                                                   max_new_tokens=MAX_NEW[i]))))

        if tp == 1:
            # tied embedding / output weight + q/k/v biases (nonzero), 2 slots
            _, chunks2 = build_model(["model.tie_word_embeddings=true", "model.add_qkv_bias=true"], seed=9,
                                     bias_noise=True)
            e2 = GenerationEngine(chunks2, max_batch_size=2, max_seq_len=64)
            res2 = e2.generate(_requests(lambda i: SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW[i])))
            out["variant"] = _pack(res2)
            out["ref_variant"] = reference_greedy(chunks2, P, MAX_NEW)
            out["ref_variant_lp"] = reference_logprobs(chunks2, P, [r.output_ids for r in res2])

        if with_pp_check:
            from megatron.core import parallel_state

            errors = {}
            try:
                GenerationEngine([model, model])
            except ValueError as e:
                errors["chunks"] = str(e)
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
            try:
                GenerationEngine(chunks)
            except NotImplementedError as e:
                errors["pp"] = str(e)
            out["errors"] = errors
        return out
    finally:
        shutdown()
