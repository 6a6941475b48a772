"""Built-in rollout engine: continuous-batching generation on the Megatron model (same weights, TP-aware).

See :mod:`megatron_kimi.rollout.engine`; :mod:`megatron_kimi.rollout.backend` is the protocol the RL
loop drives a rollout engine through.
"""

from megatron_kimi.rollout.backend import RolloutBackend
from megatron_kimi.rollout.engine import (
    EngineStats,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
)
from megatron_kimi.rollout.sampling import SamplingParams

__all__ = ["EngineStats", "GenerationEngine", "GenerationRequest", "GenerationResult", "RolloutBackend",
           "SamplingParams"]
