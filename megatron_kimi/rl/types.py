"""The data contract between rollout and training (slime-style dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    import torch


@dataclass
class Prompt:
    """One RL prompt (a line of the prompts jsonl)."""

    prompt: str
    answer: Optional[str] = None
    kind: str = "math"  # the reward to score it with: math | code | exact | a dotted path
    tests: Optional[List[dict]] = None  # code: [{"input": ..., "output": ...}]
    difficulty: Optional[float] = None
    metadata: Dict = field(default_factory=dict)
    images: Optional[List[str]] = None  # a VLM's image prompt: paths (relative to the file) or base64 (rl/images.py)


@dataclass
class Sample:
    """One response y_j to prompt x (group ``prompt_index``), with everything the trainer needs."""

    prompt_index: int
    prompt: Prompt
    prompt_ids: List[int]
    response_ids: List[int]
    response: str
    sampler_logprobs: List[float]  # per response token, from the rollout engine
    finish_reason: str  # stop | length | repeat
    reward: float = 0.0
    reward_parts: Dict[str, float] = field(default_factory=dict)  # task, length, repeat
    correct: bool = False
    ref_logp: Optional[float] = None  # log π_θi(y|x), recomputed by the trainer at the iteration start
    entropy: Optional[float] = None  # mean per-token entropy of the sampling distribution
    # log π_θi per loss token (fp32 [tokens]; the per-token log-ratios of the packed mirror-descent kernel)
    ref_token_logp: Optional[torch.Tensor] = None
    dataset_index: Optional[int] = None  # the prompt's index in the run's training prompts
    # Partial rollouts (rl/partial.py): response tokens before ``loss_start`` are context, not loss; the
    # weight version (iteration) that generated each response token.
    loss_start: int = 0
    weight_versions: Optional[List[int]] = None
    images: Optional[object] = None  # the prompt's ImageInputs (token_index over prompt_ids; rl/images.py)

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def loss_length(self) -> int:
        """Response tokens in the loss."""
        return len(self.response_ids) - self.loss_start


@dataclass
class RolloutBatch:
    """All samples of one iteration: ``k`` per prompt."""

    iteration: int
    k: int
    samples: List[Sample]
    timings: Dict[str, float] = field(default_factory=dict)
    # Set when the samples' task rewards were computed during generation (rl.async_scoring): the reward
    # error / timeout counts (on rank 0; rl/generation.py). None: not scored yet.
    reward_counts: Optional[Dict[str, int]] = None
    # Requests the backend dropped (finish reason "dropped": a remote engine failed on them after its
    # retries): not among the samples, so a group's baseline is the mean of what came back.
    dropped: int = 0

    def groups(self) -> Dict[int, List[Sample]]:
        out: Dict[int, List[Sample]] = {}
        for s in self.samples:
            out.setdefault(s.prompt_index, []).append(s)
        return out
