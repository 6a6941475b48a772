"""Prompts -> :class:`RolloutBatch` through a :class:`~megatron_kimi.rollout.backend.RolloutBackend`:
the requests (chat-formatted prompt ids, sampling parameters, per-sample seeds) and the samples.

Each data-parallel rank generates the samples of its share of the prompts (prompt ``p`` on rank
``p % dp``); an all-gather then gives every rank the whole batch, in prompt order (and sample order
within a prompt), so the rewards and the training packs are the same on every rank. A request the
backend dropped (finish reason ``"dropped"``: a remote engine failed on it after its retries) is removed
after the all-gather and counted (``RolloutBatch.dropped``): its empty response would otherwise train as
a wrong answer. With partial rollouts a dropped segment leaves its trajectory unchanged.

With an :class:`~megatron_kimi.rl.scoring.AsyncScorer` (``rl.async_scoring``), the tensor-parallel rank 0
of each data-parallel replica starts the task reward of each of its samples as soon as the backend has
finished it (``generate(..., on_result=...)``), while the rest are still generating, and waits for what
still runs before the all-gather: the scores travel with the samples, so global rank 0 (whose
data-parallel group is every replica's TP rank 0) ends up with every sample scored. The other TP ranks'
copies are not scored; the loop broadcasts rank 0's rewards to every rank (rl/loop.py).
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kimi.model.vision.vlm import ImageInputs
from megatron_kimi.rl.data import prompt_token_ids
from megatron_kimi.rl.images import PromptImages
from megatron_kimi.rl.partial import ReplayBuffer, Trajectory, loss_start
from megatron_kimi.rl.scoring import AsyncScorer
from megatron_kimi.rl.shaping import RepeatDetector
from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample
from megatron_kimi.rollout.backend import DROPPED, RolloutBackend
from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult
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

    def __init__(self, tokenizer, cfg, stop_ids: Sequence[int], images: Optional[PromptImages] = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.stop_ids = tuple(stop_ids)
        self.images = images  # a VLM: prompts with images (rl/images.py)

    def encode(self, prompt: Prompt) -> Tuple[List[int], Optional[ImageInputs]]:
        """The prompt's token ids and, for an image prompt, its images."""
        if self.images is not None:
            return self.images.encode(prompt)
        if prompt.images:
            raise ValueError(f"prompt {prompt.prompt[:60]!r} has images but the model has no vision tower "
                             "(model.vision)")
        return prompt_token_ids(self.tokenizer, prompt), None

    def sample(self, backend: RolloutBackend, iteration: int, prompts: List[Prompt], k: int,
               scorer: Optional[AsyncScorer] = None) -> RolloutBatch:
        """``k`` samples per prompt at ``rollout.temperature`` / top-p / top-k. With a ``scorer``: scored
        while generating (see the module docstring), and ``RolloutBatch.reward_counts`` set."""
        ro = self.cfg
        samples, counts, dropped = self._generate(backend, prompts, k, lambda pi, j: self._params(
            ro.temperature, request_seed(ro.seed, iteration, pi, j)), scorer)
        return RolloutBatch(iteration=iteration, k=k, samples=samples, reward_counts=counts, dropped=dropped)

    def sample_partial(self, backend: RolloutBackend, iteration: int, buffer: ReplayBuffer,
                       new_prompts: Sequence[int], train_prompts: Sequence[Prompt]) -> RolloutBatch:
        """Partial rollouts (rl/partial.py): ``k`` new trajectories per prompt of ``new_prompts`` (indices
        into ``train_prompts``) join the buffer, every unfinished trajectory gets one segment of at most
        ``rollout.partial_budget`` tokens, and the groups that are now complete come back as samples.

        ``Sample.prompt_index`` is the group id (a prompt drawn twice makes two groups; the baseline is
        per group); ``dataset_index`` the prompt's index in ``train_prompts``.

        Not scored here (no ``rl.async_scoring`` overlap in this mode): only finished trajectories are
        scored, and which are finished is known only after the round's all-gather; the loop scores the
        complete groups after generation."""
        buffer.add(new_prompts, [prompt_token_ids(self.tokenizer, train_prompts[i]) for i in new_prompts])
        complete: list = []
        dropped = 0
        # An iteration that would finish no group (so train on nothing) runs more segments under the same
        # weights until one does: every iteration then has optimizer steps, and its own checkpoint. Ends:
        # every trajectory finishes within partial_max_segments segments.
        for segment in range(buffer.max_segments):
            dropped += self.segment_round(backend, iteration, segment, buffer)
            complete = buffer.pop_complete()
            if complete or not buffer.pending():
                break
        samples = [self.from_trajectory(t, train_prompts) for group in complete for t in group]
        return RolloutBatch(iteration=iteration, k=buffer.k, samples=samples, dropped=dropped)

    def segment_round(self, backend: RolloutBackend, iteration: int, segment: int, buffer: ReplayBuffer) -> int:
        """One segment of at most ``partial_budget`` tokens for every unfinished trajectory of ``buffer``
        (DP-split, then gathered: every rank's buffer gets every segment, in the same order). A segment the
        backend dropped leaves its trajectory as it was (it gets another segment next round); returns how
        many were dropped (over every DP rank)."""
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
        dropped = 0
        for n, out, lps, reason, ent in sorted(x for part in gathered for x in part):  # same order on every rank
            if reason == DROPPED:
                dropped += 1
                continue
            buffer.extend(pending[n], out, lps, reason, version=iteration, mean_entropy=ent)
        return dropped

    def from_trajectory(self, t: Trajectory, train_prompts: Sequence[Prompt]) -> Sample:
        """The training sample of a finished trajectory."""
        n = len(t.response_ids)
        return Sample(prompt_index=t.group, prompt=train_prompts[t.prompt_index], prompt_ids=list(t.prompt_ids),
                      response_ids=list(t.response_ids),
                      response=self.tokenizer.decode(t.response_ids, skip_special_tokens=True),
                      sampler_logprobs=list(t.logprobs), finish_reason=t.finish_reason,
                      entropy=t.entropy_sum / n if n else None, dataset_index=t.prompt_index,
                      loss_start=loss_start(t, self.cfg.partial_loss_segments), weight_versions=list(t.versions))

    def greedy(self, backend: RolloutBackend, prompts: List[Prompt],
               scorer: Optional[AsyncScorer] = None) -> List[Sample]:
        """One greedy response per prompt (held-out evaluation); scored on rank 0 with a ``scorer``."""
        # seed=0: greedy decoding draws nothing, but a request without a seed would draw one from
        # torch's default generator, the trainer's RNG stream.
        return self._generate(backend, prompts, 1, lambda pi, j: self._params(0.0, 0), scorer)[0]

    def _params(self, temperature: float, seed: int, max_new_tokens: Optional[int] = None) -> SamplingParams:
        ro = self.cfg
        return SamplingParams(temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=ro.max_new_tokens if max_new_tokens is None else max_new_tokens,
                              stop_token_ids=self.stop_ids, seed=seed,
                              repeat_detector_factory=RepeatDetector if ro.repeat_detection else None)

    def _generate(self, backend: RolloutBackend, prompts: List[Prompt], k: int,
                  params_for: Callable[[int, int], SamplingParams],
                  scorer: Optional[AsyncScorer] = None) -> Tuple[List[Sample], Optional[Dict[str, int]], int]:
        """The samples (every rank: all of them, in prompt order), with a ``scorer`` the reward error /
        timeout counts over all of them (None without one; meaningful on TP rank 0), and how many requests
        the backend dropped (finish reason "dropped", over every DP rank): those are not among the samples
        (never trained on; a group keeps its other samples, so its baseline is the mean of what came back)."""
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        encoded = [self.encode(p) for p in prompts]
        ids = [e[0] for e in encoded]
        mine: List[Tuple[int, int]] = [(pi, j) for pi in range(len(prompts)) if pi % dp == dp_rank for j in range(k)]
        requests = [GenerationRequest(request_id=f"{pi}/{j}", prompt_ids=ids[pi], params=params_for(pi, j),
                                      images=encoded[pi][1]) for pi, j in mine]
        position = {r.request_id: n for n, r in enumerate(requests)}
        local: List[Optional[Sample]] = [None] * len(mine)

        def to_sample(n: int, res: GenerationResult) -> Sample:
            pi = mine[n][0]
            return Sample(prompt_index=pi, prompt=prompts[pi], prompt_ids=ids[pi], response_ids=list(res.output_ids),
                          response=self.tokenizer.decode(res.output_ids, skip_special_tokens=True),
                          sampler_logprobs=list(res.logprobs), finish_reason=res.finish_reason,
                          entropy=res.mean_entropy, images=encoded[pi][1])

        def finished(res: GenerationResult) -> None:
            n = position[res.request_id]
            local[n] = to_sample(n, res)
            if res.finish_reason != DROPPED:  # never trained on: not scored
                scorer.submit([local[n]])

        scoring = scorer is not None and parallel_state.get_tensor_model_parallel_rank() == 0
        results = backend.generate(requests, on_result=finished if scoring else None)
        counts = None
        if scoring:
            # a backend that never called on_result: its samples are scored now
            missed = [n for n, s in enumerate(local) if s is None]
            for n in missed:
                local[n] = to_sample(n, results[n])
            scorer.submit([local[n] for n in missed if local[n].finish_reason != DROPPED])
            counts = scorer.wait()
        else:
            local = [to_sample(n, res) for n, res in enumerate(results)]
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, (local, counts), group=parallel_state.get_data_parallel_group())
        samples = [s for part, _ in gathered for s in part]
        kept = [s for s in samples if s.finish_reason != DROPPED]
        kept.sort(key=lambda s: s.prompt_index)  # stable: sample order kept within a prompt
        if counts is not None:  # the DP group of a TP rank 0 holds only TP ranks 0: all scored
            counts = {key: sum(c[key] for _, c in gathered) for key in counts}
        return kept, counts, len(samples) - len(kept)
