"""Continuous-batching generation on the Megatron model itself (Kimi k1.5-style RL rollouts).

    engine = GenerationEngine(model, max_batch_size=64, max_seq_len=4096, eos_token_id=tok.eos_token_id)
    results = engine.generate([GenerationRequest(i, prompt_ids, SamplingParams(temperature=1.0, seed=i))
                               for i, prompt_ids in enumerate(prompts)])

Scheduling: ``max_batch_size`` slots share one preallocated KV cache. Every engine step first admits
waiting requests into free slots (their prompts prefilled together in one batched forward, within a
``max_prefill_tokens`` budget) and then decodes one token for *every* active sequence in one batched
forward, each token at its own position over its own slot. A finished sequence leaves at once (its
slot is refilled by compaction: the active sequences always occupy slots ``0..B-1``), and waiting
requests join at the next step while the others keep decoding.

Tensor parallelism: every TP rank runs this loop in lockstep on the same requests. Logits are
gathered to the full vocabulary; sampling is deterministic given the logits and the per-request
seeds, and the sampled tokens (with their logprobs) are broadcast from TP rank 0 so the ranks can
never drift apart. Pipeline / context parallelism: not supported (a clear error).

Memory: the KV cache is allocated at the first ``generate`` (or ``resume``) and kept between calls;
``release`` frees it (the trainer needs the memory), ``resume`` restores it. As an RL rollout backend
(:class:`~megatron_kimi.rollout.backend.RolloutBackend`) ``update_weights`` is a no-op: the engine
reads the trainer's live parameters.

Logprobs: ``GenerationResult.logprobs`` are ``log_softmax`` of the raw logits (temperature 1, over
the padded vocabulary like the trainer's loss, unless ``vocab_size`` masks the padding), i.e. the
policy's log pi of each sampled token; ``sampling_logprobs`` are those of the distribution actually
sampled from (None when that is the raw policy).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.rollout.backend import KV_CACHE, check_tags
from megatron_kimi.rollout.kv_cache import SlotKVCache
from megatron_kimi.rollout.model_runner import MegatronRunner, unwrap_gpt_model
from megatron_kimi.rollout.sampling import SamplingParams, sample_batch

FINISH_REASONS = ("stop", "length", "repeat")


@dataclass
class GenerationRequest:
    request_id: object
    prompt_ids: List[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # A VLM prompt's images (model/vision/vlm.py ImageInputs; token_index_BS [1, len(prompt_ids)]: the
    # feature row each placeholder takes, -1 for text). The built-in engine prefills their features.
    images: Optional[object] = None


@dataclass
class GenerationResult:
    request_id: object
    prompt_ids: List[int]
    output_ids: List[int]
    logprobs: List[float]  # log pi(token) under the raw model (temperature 1)
    finish_reason: str  # "stop" | "length" | "repeat"
    sampling_logprobs: Optional[List[float]] = None  # under the sampled distribution; None if = logprobs
    seed: Optional[int] = None  # the seed used (drawn when the request had none)
    mean_entropy: Optional[float] = None  # mean per-token entropy of the raw policy over the response


def check_requests(requests: Sequence[GenerationRequest], max_seq_len: int, vocab_size: int) -> None:
    """What every backend refuses: bad sampling params, an empty or too long prompt, ids outside the vocab."""
    for r in requests:
        r.params.validate()
        if len(r.prompt_ids) == 0:
            raise ValueError(f"request {r.request_id!r}: empty prompt")
        if len(r.prompt_ids) >= max_seq_len:
            raise ValueError(f"request {r.request_id!r}: prompt of {len(r.prompt_ids)} tokens does not fit "
                             f"max_seq_len={max_seq_len} (needs room for at least one new token)")
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab_size:
            raise ValueError(f"request {r.request_id!r}: token ids must be in [0, {vocab_size})")


def draw_seeds(n: int) -> torch.Tensor:
    """``n`` seeds for requests without one, from torch's default generator (seeded alike on every
    data-parallel rank by the trainer), offset by the DP rank so that DP replicas do not sample the
    same continuations."""
    dp = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    drawn = [(s + dp * 0x9E3779B97F4A7C1) % 2**62 for s in torch.randint(0, 2**62, (n,), dtype=torch.long).tolist()]
    return torch.tensor(drawn, dtype=torch.long)


@dataclass
class EngineStats:
    """Counters of the last ``generate`` call."""

    steps: int = 0  # decode steps
    prefill_calls: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (one per active sequence per step)
    generated_tokens: int = 0
    max_active: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class _Seq:
    __slots__ = ("index", "req", "params", "prompt", "out", "logprobs", "slogprobs", "length", "rng",
                 "detector", "stops", "limit", "seed", "next_token", "finish", "entropy_sum")

    def __init__(self, index: int, req: GenerationRequest, seed: int, stops: frozenset, limit: int):
        self.index = index
        self.req = req
        self.params = req.params
        self.prompt = list(req.prompt_ids)
        self.out: List[int] = []
        self.logprobs: List[float] = []
        self.slogprobs: List[float] = []
        self.entropy_sum = 0.0  # of the raw (temperature-1) distribution at each sampled position
        self.length = 0  # tokens whose K/V are in the cache
        self.seed = seed
        self.rng = random.Random(seed)
        f = req.params.repeat_detector_factory
        self.detector = f() if f is not None else None
        self.stops = stops
        self.limit = limit  # max new tokens (also bounded by the cache length)
        self.next_token: Optional[int] = None
        self.finish: Optional[str] = None


class GenerationEngine:
    """Continuous-batching generation over a Megatron GPTModel (see the module docstring).

    Args:
        model: a GPTModel, a DDP/Float16Module wrapper, or the trainer's one-element chunk list.
        max_batch_size: number of slots (sequences decoded together).
        max_seq_len: prompt + response capacity of a slot (default: the model's max sequence length).
        eos_token_id: an id (or ids) that ends every request with finish reason "stop".
        decode: ``decode(token_ids) -> str``, needed for ``SamplingParams.stop_strings``.
        max_prefill_tokens: padded-token budget of one batched prefill (a longer prompt goes alone).
        vocab_size: if set, logits of padded vocab rows (>= vocab_size) are masked out for sampling
            and logprobs (then the trainer must mask them too); default: use the padded vocab as is.
        sync_tp: broadcast the sampled tokens from TP rank 0 (a safety net; sampling is deterministic).
        decode_attention: "auto" (CPU: "bmm", two batched matmuls over the cache; GPU: "sdpa"),
            "sdpa" or "bmm".
    """

    def __init__(self, model, *, max_batch_size: int = 64, max_seq_len: Optional[int] = None,
                 eos_token_id=None, decode: Optional[Callable[[List[int]], str]] = None,
                 max_prefill_tokens: int = 8192, vocab_size: Optional[int] = None, sync_tp: bool = True,
                 decode_attention: str = "auto"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.runner = MegatronRunner(model, max_seq_len, decode_attention)
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = self.runner.max_seq_len
        if eos_token_id is None:
            self.eos_ids = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_ids = frozenset([eos_token_id])
        else:
            self.eos_ids = frozenset(int(t) for t in eos_token_id)
        self.decode_fn = decode
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.vocab_size = vocab_size
        self.sync_tp = sync_tp
        self.cache: Optional[SlotKVCache] = None
        self.released = False  # release() freed the cache; generate needs resume() first
        self.weight_version = 0
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API

    def generate(self, requests: Sequence[GenerationRequest],
                 on_result: Optional[Callable[[GenerationResult], None]] = None) -> List[GenerationResult]:
        """Generate for every request (same order). All TP ranks must call it with the same requests.

        ``on_result(result)``: called with each result as soon as it is final (in finish order, while
        the others are still generating; the result is not changed afterwards). It runs in the engine
        loop, so it must be quick: hand slow work (a reward) to another thread."""
        assert not self.released, "generate() after release(): resume() first"
        requests = list(requests)
        check_requests(requests, self.max_seq_len, self.runner.padded_vocab_size)
        for r in requests:
            if r.params.stop_strings and self.decode_fn is None:
                raise ValueError(f"request {r.request_id!r}: stop_strings need the engine's decode callable")
        seeds = self._seeds(requests)
        gpt = self.runner.gpt
        was_training = gpt.training
        gpt.eval()
        try:
            with torch.inference_mode():
                return self._run(requests, seeds, on_result)
        finally:
            gpt.train(was_training)

    # ------------------------------------------------------------------ internals

    def _seeds(self, requests) -> List[int]:
        seeds = [r.params.seed for r in requests]
        missing = [i for i, s in enumerate(seeds) if s is None]
        if missing:
            drawn = draw_seeds(len(missing))
            if self.runner.tp > 1:  # the TP ranks of a replica must sample alike
                drawn = drawn.to(self.runner.device)
                dist.broadcast(drawn, parallel_state.get_tensor_model_parallel_src_rank(),
                               group=self.runner.tp_group)
            for i, s in zip(missing, drawn.tolist()):
                seeds[i] = int(s)
        return [int(s) for s in seeds]

    def _ensure_cache(self) -> SlotKVCache:
        r = self.runner
        if self.cache is None or not self.cache.matches(len(r.layers), self.max_batch_size, r.groups,
                                                        self.max_seq_len, r.head_dim, r.dtype, r.device):
            self.cache = None
            self.cache = r.new_cache(self.max_batch_size)
        return self.cache

    def _run(self, requests: List[GenerationRequest], seeds: List[int],
             on_result: Optional[Callable[[GenerationResult], None]]) -> List[GenerationResult]:
        t_start = time.perf_counter()
        stats = self.stats = EngineStats()
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        waiting = deque()
        for i, r in enumerate(requests):
            stops = self.eos_ids | frozenset(int(t) for t in r.params.stop_token_ids)
            limit = min(r.params.max_new_tokens, self.max_seq_len - len(r.prompt_ids))
            seq = _Seq(i, r, seeds[i], stops, limit)
            if limit <= 0:
                results[i] = self._result(seq, "length")
                if on_result is not None:
                    on_result(results[i])
            else:
                waiting.append(seq)
        if not waiting:
            return results  # type: ignore[return-value]
        cache = self._ensure_cache()
        active: List[_Seq] = []  # active[b] lives in slot b
        dev = self.runner.device

        while waiting or active:
            # -- admit newcomers into the free slots (batched prefill) --------------------------
            while waiting and len(active) < self.max_batch_size:
                batch: List[_Seq] = []
                longest = 0
                while waiting and len(active) + len(batch) < self.max_batch_size:
                    n = len(waiting[0].prompt)
                    if batch and max(longest, n) * (len(batch) + 1) > self.max_prefill_tokens:
                        break
                    longest = max(longest, n)
                    batch.append(waiting.popleft())
                t0 = time.perf_counter()
                slot0 = len(active)
                logits = self.runner.prefill(cache, [s.prompt for s in batch], slot0,
                                             images=[s.req.images for s in batch])
                for s in batch:
                    s.length = len(s.prompt)
                active.extend(batch)
                self._sample_and_advance(active[slot0:], logits)
                stats.prefill_calls += 1
                stats.prefill_tokens += sum(len(s.prompt) for s in batch)
                stats.prefill_s += time.perf_counter() - t0
                self._retire(active, results, cache, on_result)
            stats.max_active = max(stats.max_active, len(active))
            if not active:
                continue
            # -- one decode step for every active sequence ---------------------------------------
            t0 = time.perf_counter()
            lengths = [s.length for s in active]
            tokens = torch.tensor([s.next_token for s in active], dtype=torch.long, device=dev)
            positions = torch.tensor(lengths, dtype=torch.long, device=dev)
            logits = self.runner.decode(cache, tokens, positions, max(lengths) + 1)
            for s in active:
                s.length += 1
            self._sample_and_advance(active, logits)
            stats.steps += 1
            stats.decode_tokens += len(active)
            stats.decode_s += time.perf_counter() - t0
            self._retire(active, results, cache, on_result)
        stats.generated_tokens = sum(len(r.output_ids) for r in results)
        stats.wall_s = time.perf_counter() - t_start
        return results  # type: ignore[return-value]

    def _sample_and_advance(self, seqs: List[_Seq], logits: torch.Tensor) -> None:
        """Sample the next token of each of ``seqs`` (rows of ``logits``) and apply the stop rules."""
        if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
            logits = logits.float()
            logits[:, self.vocab_size:] = float("-inf")
        uniforms = [None if s.params.greedy else s.rng.random() for s in seqs]
        tokens, logp, slogp = sample_batch(
            logits, [s.params.temperature for s in seqs], [s.params.top_k for s in seqs],
            [s.params.top_p for s in seqs], uniforms)
        lsm = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(lsm.exp() * lsm.masked_fill(torch.isinf(lsm), 0.0)).sum(-1)
        packed = torch.stack([tokens.double(), logp.double(), slogp.double(), entropy.double()], dim=1)
        if self.runner.tp > 1 and self.sync_tp:
            dist.broadcast(packed, parallel_state.get_tensor_model_parallel_src_rank(), group=self.runner.tp_group)
        rows = packed.cpu().tolist()
        for s, (tok, lp, slp, ent) in zip(seqs, rows):
            tok = int(tok)
            s.entropy_sum += ent
            s.out.append(tok)
            s.logprobs.append(lp)
            s.slogprobs.append(slp)
            s.next_token = tok
            p = s.params
            if tok in s.stops:
                s.finish = "stop"
            elif p.stop_strings and self._hit_stop_string(s.out, p.stop_strings):
                s.finish = "stop"
            elif s.detector is not None and s.detector.update(tok):
                s.finish = "repeat"
            elif len(s.out) >= s.limit:
                s.finish = "length"

    def _hit_stop_string(self, out: List[int], stop_strings: Sequence[str]) -> bool:
        """Does the decoded response contain a stop string? Only a tail window is decoded: a stop
        string not there now ended before this token and was caught then (assumes tokens decode to
        >= 1 character on average over the window; the window is 2x the longest stop string + 8)."""
        window = 2 * max(len(x) for x in stop_strings) + 8
        text = self.decode_fn(out[-window:])
        return any(x in text for x in stop_strings)

    # ------------------------------------------------------------------ RolloutBackend lifecycle

    def update_weights(self, model) -> None:
        """Nothing to copy: the engine runs the trainer's own modules, so it always has their weights."""
        assert unwrap_gpt_model(model) is self.runner.gpt, "the built-in engine generates with the model it was built on"
        self.weight_version += 1

    def release(self) -> None:
        """Free the KV cache for training. (On CUDA the blocks go back to PyTorch's caching allocator,
        which the trainer, in this process, reuses; no ``empty_cache``.)"""
        self.cache = None
        self.released = True

    def resume(self, tags=None) -> None:
        """Allocate the KV cache again (as the first ``generate`` would); the weights are the trainer's,
        so ``"weights"`` alone does nothing."""
        if KV_CACHE in check_tags(tags):
            self.released = False
            self._ensure_cache()

    def close(self) -> None:
        self.release()

    def _retire(self, active: List[_Seq], results: List, cache: SlotKVCache,
                on_result: Optional[Callable[[GenerationResult], None]] = None) -> None:
        """Remove finished sequences; keep the rest compacted in slots 0..B'-1."""
        if not any(s.finish for s in active):
            return
        keep = [b for b, s in enumerate(active) if not s.finish]
        for s in active:
            if s.finish:
                results[s.index] = self._result(s, s.finish)
                if on_result is not None:
                    on_result(results[s.index])
        n = len(keep)
        holes = [b for b in range(n) if active[b].finish]  # slots < n to refill
        movers = [b for b in keep if b >= n]  # survivors beyond the new end
        if holes:
            cache.move(movers, holes, max(active[b].length for b in movers))
        new = [active[b] for b in range(n)]
        for h, m in zip(holes, movers):
            new[h] = active[m]
        active[:] = new

    @staticmethod
    def _result(s: _Seq, reason: str) -> GenerationResult:
        raw = s.params.is_raw_policy
        return GenerationResult(request_id=s.req.request_id, prompt_ids=s.prompt, output_ids=s.out,
                                logprobs=s.logprobs, finish_reason=reason,
                                sampling_logprobs=None if raw else s.slogprobs, seed=s.seed,
                                mean_entropy=s.entropy_sum / len(s.out) if s.out else None)
