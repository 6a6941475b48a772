"""Triton kernels with pure-PyTorch references, installed as ``megatron_kimi.kernels``.

(Not a top-level ``kernels`` package: transformers reserves that name for its hub kernels.)
The varlen attention, fused log-prob and mirror-descent loss kernels land with the long-context
issue; until then the model uses the PyTorch paths in ``megatron_kimi.model.attention``.
"""
