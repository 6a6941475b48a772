"""Prompts -> :class:`RolloutBatch` through a :class:`~megatron_kimi.rollout.backend.RolloutBackend`:
the requests (chat-formatted prompt ids, sampling parameters, per-sample seeds) and the samples.

Each data-parallel rank generates the samples of its share of the prompts (prompt ``p`` on rank
``p % dp``); an all-gather then gives every rank the whole batch, in prompt order (and sample order
within a prompt), so the rewards and the training packs are the same on every rank.
"""

from __future__ import annotations

import zlib
from typing import Callable, List, Sequence, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.rl.data import prompt_token_ids
from megatron_kimi.rl.shaping import RepeatDetector
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample
from megatron_kimi.rollout.backend import RolloutBackend
from megatron_kimi.rollout.engine import GenerationRequest
from megatron_kimi.rollout.sampling import SamplingParams


def request_seed(rollout_seed: int, iteration: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of sample ``sample_index`` of prompt ``prompt_index`` in ``iteration``.

    A hash of the four, not a draw from a running generator: a sample's tokens do not depend on the
    rank or engine slot that generates it, and a resumed run regenerates the same samples."""
    return zlib.crc32(f"{rollout_seed}|{iteration}|{prompt_index}|{sample_index}".encode())


class SampleGenerator:
    """Turns prompts into samples with a backend (``cfg``: the ``rollout:`` section). The backend's
    lifecycle (resume / release) is the caller's."""

    def __init__(self, tokenizer, cfg, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.stop_ids = tuple(stop_ids)

    def sample(self, backend: RolloutBackend, iteration: int, prompts: List[Prompt], k: int) -> RolloutBatch:
        """``k`` samples per prompt at ``rollout.temperature`` / top-p / top-k."""
        ro = self.cfg
        return RolloutBatch(iteration=iteration, k=k, samples=self._generate(backend, prompts, k, lambda pi, j: self._params(
            ro.temperature, request_seed(ro.seed, iteration, pi, j))))

    def greedy(self, backend: RolloutBackend, prompts: List[Prompt]) -> List[Sample]:
        """One greedy response per prompt (held-out evaluation)."""
        # seed=0: greedy decoding draws nothing, but a request without a seed would draw one from
        # torch's default generator, the trainer's RNG stream.
        return self._generate(backend, prompts, 1, lambda pi, j: self._params(0.0, 0))

    def _params(self, temperature: float, seed: int) -> SamplingParams:
        ro = self.cfg
        return SamplingParams(temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=ro.max_new_tokens, stop_token_ids=self.stop_ids, seed=seed,
                              repeat_detector_factory=RepeatDetector if ro.repeat_detection else None)

    def _generate(self, backend: RolloutBackend, prompts: List[Prompt], k: int,
                  params_for: Callable[[int, int], SamplingParams]) -> List[Sample]:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        mine: List[Tuple[int, int]] = [(pi, j) for pi in range(len(prompts)) if pi % dp == dp_rank for j in range(k)]
        results = backend.generate([GenerationRequest(request_id=f"{pi}/{j}", prompt_ids=ids[pi],
                                                           params=params_for(pi, j)) for pi, j in mine])
        local = [Sample(prompt_index=pi, prompt=prompts[pi], prompt_ids=ids[pi], response_ids=list(res.output_ids),
                        response=self.tokenizer.decode(res.output_ids, skip_special_tokens=True),
                        sampler_logprobs=list(res.logprobs), finish_reason=res.finish_reason,
                        entropy=res.mean_entropy)
                 for (pi, _j), res in zip(mine, results)]
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
        samples = [s for part in gathered for s in part]
        samples.sort(key=lambda s: s.prompt_index)  # stable: sample order kept within a prompt
        return samples
