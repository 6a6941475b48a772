"""model/norm.py: the CUDA path (torch's fused ``F.rms_norm``) computes what the fp32 reference does.

``F.rms_norm`` exists on CPU too (a composite of the same ops), so the call itself, with our argument
order, normalized shape and eps, is checked here against the reference in fp32, values and gradients;
the ``gpu`` test checks the fused CUDA kernel in fp32 and bf16 through the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_kimi.model.norm import rms_norm_ref


def _grads(fn, x, w):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    g = torch.randn_like(y, generator=torch.Generator(device=y.device.type).manual_seed(1))
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_f_rms_norm_call_equals_the_reference_fp32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 3, 48, generator=g) * 3, torch.randn(48, generator=g)
    got = _grads(lambda a, b: F.rms_norm(a, (a.shape[-1],), b, 1e-5), x, w)
    want = _grads(lambda a, b: rms_norm_ref(a, b, 1e-5), x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_on_cuda_matches_the_reference(dtype):
    from types import SimpleNamespace

    from megatron_kimi.model.norm import RMSNorm

    norm = RMSNorm(SimpleNamespace(use_cpu_initialization=False, params_dtype=dtype, sequence_parallel=False), 256)
    assert norm.weight.is_cuda
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, device="cuda"))
    x = (torch.randn(64, 2, 256, device="cuda") * 2).to(dtype)
    got = _grads(lambda a, b: torch.func.functional_call(norm, {"weight": b}, (a,)), x, norm.weight)
    want = _grads(lambda a, b: rms_norm_ref(a, b, norm.eps), x, norm.weight)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)
