"""Prompts -> :class:`RolloutBatch` through a :class:`~megatron_kimi.rollout.backend.RolloutBackend`:
the requests (chat-formatted prompt ids, sampling parameters, per-sample seeds) and the samples.

Each data-parallel rank generates the samples of its share of the prompts (prompt ``p`` on rank
``p % dp``); an all-gather then gives every rank the whole batch, in prompt order (and sample order
within a prompt), so the rewards and the training packs are the same on every rank.
"""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.rl.data import prompt_token_ids
from megatron_kimi.rl.partial import ReplayBuffer, Trajectory, loss_start
from megatron_kimi.rl.shaping import RepeatDetector
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample
from megatron_kimi.rollout.backend import RolloutBackend
from megatron_kimi.rollout.engine import GenerationRequest
from megatron_kimi.rollout.sampling import SamplingParams


def request_seed(rollout_seed: int, iteration: int, prompt_index: int, sample_index: int, segment: int = 0) -> int:
    """The sampling seed of sample ``sample_index`` of prompt ``prompt_index`` in ``iteration`` (partial
    rollouts: of its ``segment``-th round within the iteration).

    A hash of them, not a draw from a running generator: a sample's tokens do not depend on the
    rank or engine slot that generates it, and a resumed run regenerates the same samples."""
    key = f"{rollout_seed}|{iteration}|{prompt_index}|{sample_index}" + (f"|{segment}" if segment else "")
    return zlib.crc32(key.encode())


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

    def sample_partial(self, backend: RolloutBackend, iteration: int, buffer: ReplayBuffer,
                       new_prompts: Sequence[int], train_prompts: Sequence[Prompt]) -> RolloutBatch:
        """Partial rollouts (rl/partial.py): ``k`` new trajectories per prompt of ``new_prompts`` (indices
        into ``train_prompts``) join the buffer, every unfinished trajectory gets one segment of at most
        ``rollout.partial_budget`` tokens, and the groups that are now complete come back as samples.

        ``Sample.prompt_index`` is the group id (a prompt drawn twice makes two groups; the baseline is
        per group); ``dataset_index`` the prompt's index in ``train_prompts``."""
        buffer.add(new_prompts, [prompt_token_ids(self.tokenizer, train_prompts[i]) for i in new_prompts])
        complete: list = []
        # An iteration that would finish no group (so train on nothing) runs more segments under the same
        # weights until one does: every iteration then has optimizer steps, and its own checkpoint. Ends:
        # every trajectory finishes within partial_max_segments segments.
        for segment in range(buffer.max_segments):
            self.segment_round(backend, iteration, segment, buffer)
            complete = buffer.pop_complete()
            if complete or not buffer.pending():
                break
        samples = [self.from_trajectory(t, train_prompts) for group in complete for t in group]
        return RolloutBatch(iteration=iteration, k=buffer.k, samples=samples)

    def segment_round(self, backend: RolloutBackend, iteration: int, segment: int, buffer: ReplayBuffer) -> None:
        """One segment of at most ``partial_budget`` tokens for every unfinished trajectory of ``buffer``
        (DP-split, then gathered: every rank's buffer gets every segment, in the same order)."""
        ro = self.cfg
        pending = buffer.pending()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        mine = [n for n in range(len(pending)) if n % dp == dp_rank]
        # The seed hashes the group id, not the prompt (two draws of one prompt sample differently), and
        # the round (a second round within an iteration draws afresh).
        results = backend.generate([GenerationRequest(
            request_id=f"{pending[n].group}/{pending[n].sample_index}", prompt_ids=pending[n].next_input(),
            params=self._params(ro.temperature, request_seed(ro.seed, iteration, pending[n].group,
                                                             pending[n].sample_index, segment),
                                max_new_tokens=buffer.budget_for(pending[n]))) for n in mine])
        local = [(n, list(r.output_ids), list(r.logprobs), r.finish_reason, r.mean_entropy)
                 for n, r in zip(mine, results)]
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
        for n, out, lps, reason, ent in sorted(x for part in gathered for x in part):  # same order on every rank
            buffer.extend(pending[n], out, lps, reason, version=iteration, mean_entropy=ent)

    def from_trajectory(self, t: Trajectory, train_prompts: Sequence[Prompt]) -> Sample:
        """The training sample of a finished trajectory."""
        n = len(t.response_ids)
        return Sample(prompt_index=t.group, prompt=train_prompts[t.prompt_index], prompt_ids=list(t.prompt_ids),
                      response_ids=list(t.response_ids),
                      response=self.tokenizer.decode(t.response_ids, skip_special_tokens=True),
                      sampler_logprobs=list(t.logprobs), finish_reason=t.finish_reason,
                      entropy=t.entropy_sum / n if n else None, dataset_index=t.prompt_index,
                      loss_start=loss_start(t, self.cfg.partial_loss_segments), weight_versions=list(t.versions))

    def greedy(self, backend: RolloutBackend, prompts: List[Prompt]) -> List[Sample]:
        """One greedy response per prompt (held-out evaluation)."""
        # seed=0: greedy decoding draws nothing, but a request without a seed would draw one from
        # torch's default generator, the trainer's RNG stream.
        return self._generate(backend, prompts, 1, lambda pi, j: self._params(0.0, 0))

    def _params(self, temperature: float, seed: int, max_new_tokens: Optional[int] = None) -> SamplingParams:
        ro = self.cfg
        return SamplingParams(temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=ro.max_new_tokens if max_new_tokens is None else max_new_tokens,
                              stop_token_ids=self.stop_ids, seed=seed,
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
