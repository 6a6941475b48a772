"""Rank bodies of the vLLM-server-backend tests (module level so that spawn can import them).

``fake_server_job``: the backend on a tiny Megatron model against fake servers running in the test
process (tests/rollout/fake_vllm_server.py; no vLLM). ``real_server_job``: against a real vLLM server the
backend starts (needs ``vllm``), compared with the trainer's forward.
"""

from __future__ import annotations

from pathlib import Path

from tests.rollout import bodies

KW = dict(max_seq_len=64, max_batch_size=4, request_timeout_s=5.0, request_retries=1, backoff_s=0.05)



def _sync_as_the_loop_does(backend, chunks):
    """release, wake the weights, sync, wake the KV cache (rl/loop.py); -> (weight_version, sync timing)."""
    backend.release()
    backend.resume(["weights"])
    backend.update_weights(chunks)
    backend.resume(["kv_cache"])
    return backend.weight_version, (backend.last_sync_s, backend.last_sync_bytes, backend.last_sync_gbps)

def _shapes(directory) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = list(s.get_slice(k).get_shape())
    return out


def fake_server_job(rank, world_size, tp, urls, weights_dirs):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import load_config
    from megatron_kimi.convert import hf
    from megatron_kimi.rollout import GenerationRequest, RolloutBackend, SamplingParams
    from megatron_kimi.rollout.server_backend import VllmServerBackend
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE

    overrides = [f"parallel.tensor={tp}"]
    initialize(load_config(None, BASE + bodies.MODEL + overrides))
    cfg, chunks = bodies.build_model(overrides)
    P = bodies.prompts()
    out = {}

    backend = VllmServerBackend(chunks, cfg.model, url=urls["ok"], weights_dir=weights_dirs["ok"], **KW)
    try:
        out["is_backend"] = isinstance(backend, RolloutBackend)
        seen = []
        res = backend.generate([GenerationRequest(i, p, SamplingParams(temperature=0.0, max_new_tokens=4))
                                for i, p in enumerate(P)], on_result=seen.append)
        out["greedy"] = [(r.output_ids, r.logprobs, r.finish_reason) for r in res]
        out["on_result"] = sorted(r.request_id for r in seen)
        out["dropped"] = backend.last_dropped
        # the loop's lifecycle: release, wake the weights, sync, wake the KV cache (no-ops but the state)
        out["version"], out["sync"] = _sync_as_the_loop_does(backend, chunks)
        out["file_shapes"] = _shapes(weights_dirs["ok"])
        out["hf_shapes"] = {k: list(v) for k, v in hf.hf_shapes(backend.arch).items()}
        out["config_json"] = (Path(weights_dirs["ok"]) / "config.json").is_file()
        import torch.distributed as dist

        dist.barrier()  # every rank has read the files before the next sync replaces them
        backend.update_weights(chunks)
        out["version2"] = backend.weight_version
    finally:
        backend.close()

    b2 = VllmServerBackend(chunks, cfg.model, url=urls["no_reset"], weights_dir=weights_dirs["no_reset"], **KW)
    try:
        b2.update_weights(chunks)
    except RuntimeError as e:
        out["reset_error"] = str(e)
    out["reset_version"] = b2.weight_version
    b2.close()

    try:
        VllmServerBackend(chunks, cfg.model, url=urls["no_dev"], weights_dir=weights_dirs["no_dev"], **KW)
    except ValueError as e:
        out["dev_error"] = str(e)
    return out


def real_server_job(rank, world_size, log_dir):
    """The backend starts a real vLLM server on the demo-shaped RoPE model (vllm_bodies.MODELS["demo"])."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    import torch

    from megatron_kimi.config import load_config
    from megatron_kimi.rollout import GenerationRequest, SamplingParams
    from megatron_kimi.rollout.server_backend import VllmServerBackend
    from megatron_kimi.training.runtime import initialize
    from tests.parallel.harness import BASE
    from tests.rollout import vllm_bodies as vb

    overrides = vb.MODELS["demo"]
    initialize(load_config(None, BASE + bodies.MODEL + overrides))
    cfg, chunks = bodies.build_model(overrides)
    P = bodies.prompts()
    out = {}

    def reqs(params_for):
        return [GenerationRequest(i, p, params_for(i)) for i, p in enumerate(P)]

    def lps(results):
        return [r.logprobs for r in results]

    backend = VllmServerBackend(chunks, cfg.model, max_seq_len=vb.MAX_SEQ, max_batch_size=4, seed=0,
                                sync_bucket_mb=0.05, start_timeout_s=600, log_dir=log_dir)
    out["start_s"], out["log"], out["url"] = backend.start_s, str(backend.log_path), backend.url
    pid = backend.process.pid
    try:
        greedy = backend.generate(reqs(lambda i: SamplingParams(temperature=0.0, max_new_tokens=vb.MAX_NEW)))
        outs = [r.output_ids for r in greedy]
        out["greedy"], out["greedy_finish"] = outs, [r.finish_reason for r in greedy]
        out["ref_greedy"] = bodies.reference_greedy(chunks, P, [vb.MAX_NEW] * len(P))
        out["greedy_lp_diff"] = vb._max_diff(lps(greedy), bodies.reference_logprobs(chunks, P, outs))

        raw = backend.generate(reqs(lambda i: SamplingParams(max_new_tokens=vb.MAX_NEW, seed=10 + i)))
        out["raw_lp_diff"] = vb._max_diff(lps(raw), bodies.reference_logprobs(chunks, P, [r.output_ids for r in raw]))
        topk = backend.generate(reqs(lambda i: SamplingParams(temperature=0.7, top_k=20, max_new_tokens=vb.MAX_NEW,
                                                              seed=200 + i)))
        out["topk_lp_diff"] = vb._max_diff(lps(topk), bodies.reference_logprobs(chunks, P, [r.output_ids for r in topk]))
        out["topk_slp_diff"] = vb._max_diff([r.sampling_logprobs for r in topk], vb._processed_logprobs(
            chunks, P, [r.output_ids for r in topk], 0.7, 20))
        out["dropped"] = backend.dropped

        # the real server's answers, to compare with the fake's shapes
        r0 = reqs(lambda i: SamplingParams(temperature=0.7, top_k=20, max_new_tokens=3, seed=5))[0]
        body = backend.rollout.completion_body(r0, 5, 3)
        out["body"], out["answer"] = body, backend.client.attempt("POST", "/v1/completions", body)
        sbody = backend.rollout.score_body(P[0], outs[0])
        out["score_body"], out["score_answer"] = sbody, backend.client.attempt("POST", "/v1/completions", sbody)

        # weight sync of perturbed weights
        vb._perturb(chunks, seed=1)
        ref_new = bodies.reference_logprobs(chunks, P, outs)
        out["before_sync_diff"] = vb._max_diff(backend.score(P, outs), ref_new)
        out["version"], out["sync"] = _sync_as_the_loop_does(backend, chunks)
        out["after_sync_diff"] = vb._max_diff(backend.score(P, outs), ref_new)
        after = backend.generate(reqs(lambda i: SamplingParams(temperature=0.0, max_new_tokens=vb.MAX_NEW)))
        out["after_greedy"] = [r.output_ids for r in after]
        out["after_ref_greedy"] = bodies.reference_greedy(chunks, P, [vb.MAX_NEW] * len(P))
        out["after_greedy_lp_diff"] = vb._max_diff(lps(after), bodies.reference_logprobs(
            chunks, P, [r.output_ids for r in after]))

        # the prefix cache: a long prompt cached under the old weights; reload without / with the reset
        g = torch.Generator().manual_seed(9)
        long = [torch.randint(0, 100, (vb.LONG_PROMPT,), generator=g).tolist()]
        one = [GenerationRequest("long", long[0], SamplingParams(temperature=0.0, max_new_tokens=4))]
        backend.generate(one)
        vb._perturb(chunks, seed=2)
        backend._export(chunks)
        backend.client.reload_weights(backend.dir)  # what update_weights does, minus /reset_prefix_cache
        stale = backend.generate(one)
        out["stale_diff"] = vb._max_diff(lps(stale), bodies.reference_logprobs(chunks, long, [stale[0].output_ids]))
        backend.update_weights(chunks)
        fresh = backend.generate(one)
        out["fresh_diff"] = vb._max_diff(lps(fresh), bodies.reference_logprobs(chunks, long, [fresh[0].output_ids]))
    finally:
        d = backend.dir
        backend.close()
        out["dir_removed"] = not d.exists()
        out["server_gone"] = not Path(f"/proc/{pid}").exists()
    return out


def rl_loop_job(rank, world_size, run_dir, url, weights_dir):
    """The RL loop (commands/rl.py wiring, rl/loop.py) with ``rollout.engine=vllm_server`` on a fake server
    given by URL: the demo's model with RoPE (the export needs a rotary model)."""
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.commands.rl import build_rl_job
    from megatron_kimi.config import RLConfig, load_config
    from megatron_kimi.rl import loop
    from megatron_kimi.rollout.server_backend import VllmServerBackend
    from megatron_kimi.training.checkpointer import Checkpointer
    from megatron_kimi.training.metrics import MetricsWriter
    from megatron_kimi.training.runtime import initialize, shutdown
    from tests.rl.bodies import OVERRIDES, REPO

    cfg = load_config(str(REPO / "examples/demo/rl.yaml"),
                      [f"run_dir={run_dir}", *OVERRIDES, "model.position_embedding_type=rope",
                       "rollout.engine=vllm_server", f"rollout.server_url={url}",
                       f"rollout.server_weights_dir={weights_dir}", "rollout.request_timeout_s=5",
                       "rollout.request_retries=1"], RLConfig)
    ctx = initialize(cfg)
    try:
        job = build_rl_job(cfg, ctx)
        assert isinstance(job.backend, VllmServerBackend)
        job.backend.rollout.client.backoff_s = 0.01
        summary, history = loop.train(job, MetricsWriter.from_config(cfg, enabled=False),
                                      Checkpointer.from_config(cfg, job.trainer), Path(run_dir), resumed_from=None)
        return {"history": history, "summary": summary, "dropped": job.backend.dropped,
                "version": job.backend.weight_version}
    finally:
        shutdown()
