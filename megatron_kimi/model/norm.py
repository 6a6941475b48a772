"""RMSNorm that works under Megatron sequence parallelism without Transformer Engine.

Megatron's torch-norm wrapper asserts on sequence parallelism. Under SP each tensor-parallel rank
normalises a different slice of the sequence, so the norm weight's gradient is a partial sum;
Megatron all-reduces the grads of params marked ``sequence_parallel=True`` across the TP group
(``finalize_model_grads``). This module marks its weight accordingly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def norm_parameter(config: TransformerConfig, hidden_size: int, value: float) -> torch.nn.Parameter:
    """A norm's weight or bias, filled with ``value``, marked for the TP grad all-reduce under SP."""
    # Same placement rule as Megatron's own layers, so a model built on a GPU is wholly on it.
    on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
    device = torch.cuda.current_device() if on_gpu else "cpu"
    p = torch.nn.Parameter(torch.full((hidden_size,), value, dtype=config.params_dtype, device=device))
    setattr(p, "sequence_parallel", bool(config.sequence_parallel))
    return p


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = norm_parameter(config, hidden_size, 1.0)

    def forward(self, x_SBH: torch.Tensor) -> torch.Tensor:
        if x_SBH.is_cuda and x_SBH.dtype == self.weight.dtype:
            # torch's own RMSNorm: one fused kernel each way on CUDA (fp32 statistics) instead of ~6
            # elementwise kernels forward and ~10 backward, each a full pass over the activations.
            return F.rms_norm(x_SBH, (x_SBH.shape[-1],), self.weight, self.eps)
        return rms_norm_ref(x_SBH, self.weight, self.eps)


def rms_norm_ref(x_SBH: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The CPU path (and the reference): fp32 throughout, like HF's LlamaRMSNorm."""
    x = x_SBH.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x_SBH.dtype)


class LayerNorm(torch.nn.Module):
    """LayerNorm with bias (the vision tower's and projector's), placed like :class:`RMSNorm`.

    Megatron's local LayerNorm is apex's when installed and ``WrappedTorchNorm`` otherwise; this one
    is the same math on every machine (torch's ``layer_norm``), so HF parity does not depend on apex.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = norm_parameter(config, hidden_size, 1.0)
        self.bias = norm_parameter(config, hidden_size, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
