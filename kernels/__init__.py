"""Triton kernels with pure-PyTorch references, installed as ``megatron_kimi.kernels``.

(Not a top-level ``kernels`` package: transformers reserves that name for its hub kernels.)

* ``varlen_attention`` — packed (cu_seqlens) causal flash attention, forward + backward, GQA,
  bottom-right causal alignment (context-parallel prefixes), returns the LSE.
* ``fused_logprob`` — vocab-parallel token log-prob + entropy without full fp32 logits.
* ``mirror_descent_loss`` — Kimi k1.5's per-sequence squared surrogate, fused with the log-prob.

Dispatch: Triton on CUDA tensors; on CPU the PyTorch reference (for ``fused_logprob`` a chunked
PyTorch path, so it stays memory-lean there too), or the Triton kernel under the interpreter when
``TRITON_INTERPRET=1`` was set before import (the tests do this).
"""
