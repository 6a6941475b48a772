"""kernels/fused_logprob.py: fused token log-prob + entropy vs the naive full-logits reference.

On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), in fp32 (the
interpreter's bf16 tl.dot is not faithful); where they are compiled (a GPU machine) the "triton" cases
run on CUDA tensors and the spawned CPU ranks use the interpreter (tests/dist.py). Both implementations ("triton" and the chunked "torch"
path) are checked against ``token_logprob_entropy_ref``, single-device and on 2 real gloo TP ranks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_kimi.kernels import fused_logprob as fl
from megatron_kimi.kernels.fused_logprob import token_logprob_entropy, token_logprob_entropy_ref
from tests.dist import run_distributed

# fp32: both sides accumulate fp32 dot products over H and sums over V in different orders;
# observed differences are ~1e-6, so 2e-5 absolute (+1e-4 relative) leaves margin without hiding bugs.
FP32_TOL = dict(atol=2e-5, rtol=1e-4)
# bf16 (GPU): inputs are the same bf16 values on both sides and the dot products accumulate in fp32,
# so logp/entropy stay close (1e-3 of values ~10); dz is stored in bf16 (relative 2^-8) before the
# gradient matmuls, so gradients get ~1e-2 relative error.
BF16_VAL_TOL = dict(atol=2e-3, rtol=2e-3)
BF16_GRAD_TOL = dict(atol=2e-2, rtol=2e-2)

BACKENDS = ["torch", "triton"]
# The Triton kernels take CPU tensors only under the interpreter; compiled, they run on the GPU.
TRITON_DEVICE = "cpu" if fl._INTERPRETED else "cuda"
# fp32 on the GPU: different reduction orders (and split-K) than the CPU reference.
CUDA_FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _tol(backend, cpu_tol=FP32_TOL):
    return CUDA_FP32_TOL if _device(backend) == "cuda" else cpu_tol


def _to(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


def _inputs(T, H, V, scale=0.5, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g) * scale).to(dtype=dtype, device=device)
    weight = (torch.randn(V, H, generator=g) * scale).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (T,), generator=g).to(device)
    g_logp = torch.randn(T, generator=g).to(device)
    g_ent = torch.randn(T, generator=g).to(device)
    return hidden, weight, labels, g_logp, g_ent


def _run(fn, hidden, weight, labels, g_logp, g_ent, **kw):
    """Forward, then backward of Σ g_logp·logp + Σ g_ent·entropy (a term is dropped when its g is None)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, ent = fn(h, w, labels, **kw)
    loss = 0.0
    if g_logp is not None:
        loss = loss + (logp * g_logp).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return tuple(t.cpu() for t in (logp.detach(), ent.detach(), h.grad, w.grad))


def _close(got, want, tol):
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,V,temperature,token_block,vocab_chunk", [
    (1, 32, 257, 1.0, 8192, None),   # one token, one vocab chunk of 257 rows (not a 1024 epilogue tile)
    (17, 64, 1000, 0.7, 5, 300),     # 4 token blocks x 4 vocab chunks, both last ones partial
    (400, 32, 257, 1.3, 150, None),  # token blocks not dividing T: the fp32 weight-grad accumulator
    (160, 64, 1000, 1.0, 8192, 128),  # one token block (weight grad by one GEMM per chunk), 8 chunks
])
def test_matches_reference(backend, T, H, V, temperature, token_block, vocab_chunk):
    args = _inputs(T, H, V)
    got = _run(token_logprob_entropy, *_to(_device(backend), *args), temperature=temperature,
               token_block=token_block, vocab_chunk=vocab_chunk, backend=backend)
    want = _run(token_logprob_entropy_ref, *args, temperature=temperature)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _close(got, want, _tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logp_only", "entropy_only"])
def test_one_output_used(backend, which):
    """Backward with g_ent (or g_logp) None: the unused output's term is skipped, not NaN."""
    hidden, weight, labels, g_logp, g_ent = _inputs(40, 64, 300, seed=1)
    g_logp, g_ent = (g_logp, None) if which == "logp_only" else (None, g_ent)
    got = _run(token_logprob_entropy, *_to(_device(backend), hidden, weight, labels, g_logp, g_ent), token_block=16,
               vocab_chunk=128, backend=backend)
    want = _run(token_logprob_entropy_ref, hidden, weight, labels, g_logp, g_ent)
    _close(got, want, _tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_and_unowned_labels(backend):
    """Logits of magnitude ~100 stay finite and exact; a label no rank owns (-100) gives logp = -logZ."""
    hidden, weight, labels, g_logp, g_ent = _inputs(24, 32, 200, scale=2.5, seed=2)
    labels[3] = -100
    labels[4] = 199  # the last row of the last (partial) vocab chunk
    got = _run(token_logprob_entropy, *_to(_device(backend), hidden, weight, labels, g_logp, g_ent), token_block=10,
               vocab_chunk=64, backend=backend)
    want = _run(token_logprob_entropy_ref, hidden, weight, labels, g_logp, g_ent)
    assert all(torch.isfinite(t).all() for t in got)
    _close(got, want, dict(atol=2e-4, rtol=1e-4))  # |logits| ~ 100: fp32 ulp ~1e-5


def test_vocab_chunks_combine_exactly():
    """Partial statistics over any number of vocab chunks (and either epilogue) combine to one answer."""
    hidden, weight, labels, _, _ = _inputs(20, 32, 700, seed=3)
    ref = fl._combine(fl._stats(hidden, weight, labels, 0, 1.0, 20, 700, use_triton=False), None)
    dev = _to(TRITON_DEVICE, hidden, weight, labels)
    for token_block, vocab_chunk in ((20, 700), (7, 350), (20, 100), (3, 33)):
        for use_triton, d in ((False, (hidden, weight, labels)), (True, dev)):
            stats = fl._stats(*d, 0, 1.0, token_block, vocab_chunk, use_triton=use_triton)
            assert stats.shape == (4, -(-700 // vocab_chunk), 20)
            for a, b in zip(fl._combine(stats, None), ref):
                torch.testing.assert_close(a.cpu(), b, **(_tol("triton") if use_triton else FP32_TOL))


def test_default_block_sizes():
    """The default vocab chunk keeps one fp32 logits block near 128 MiB and on 256-row multiples."""
    assert fl._vocab_chunk(8192, 151936, None) == 4096
    assert fl._vocab_chunk(100, 151936, None) == 151936  # a small T: the whole shard at once
    assert fl._vocab_chunk(10 ** 6, 151936, None) == 256  # a floor, so each GEMM stays a real GEMM
    assert fl._vocab_chunk(8192, 1000, 300) == 300


def test_no_grad_and_weight_only():
    hidden, weight, labels, g_logp, _ = _inputs(9, 32, 130, seed=4)
    with torch.no_grad():
        logp, ent = token_logprob_entropy(*_to(TRITON_DEVICE, hidden, weight, labels), backend="triton")
    assert not logp.requires_grad
    logp = logp.cpu()
    w = weight.clone().requires_grad_(True)
    logp2, _ = token_logprob_entropy(hidden, w, labels, token_block=4, vocab_chunk=64, backend="torch")
    (logp2 * g_logp).sum().backward()
    w_ref = weight.clone().requires_grad_(True)
    (token_logprob_entropy_ref(hidden, w_ref, labels)[0] * g_logp).sum().backward()
    torch.testing.assert_close(logp, logp2.detach(), **_tol("triton"))
    torch.testing.assert_close(w.grad, w_ref.grad, **FP32_TOL)


def test_backend_dispatch_and_validation(monkeypatch):
    cpu = torch.device("cpu")
    assert fl.resolve_backend("auto", cpu) == ("triton" if fl._INTERPRETED else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fl.resolve_backend("auto", cpu) == "torch"
    assert fl.resolve_backend("ref", cpu) == "ref"
    with pytest.raises(ValueError, match="backend"):
        fl.resolve_backend("cuda", cpu)
    h, w, lab, _, _ = _inputs(4, 32, 50)
    for backend in BACKENDS:  # no tokens: empty outputs, no kernel launch
        logp, ent = token_logprob_entropy(*_to(_device(backend), h[:0], w, lab[:0]), backend=backend)
        assert logp.shape == ent.shape == (0,)
    with pytest.raises(ValueError, match="hidden size"):
        token_logprob_entropy(h, w[:, :16], lab)
    with pytest.raises(ValueError, match="labels_T"):
        token_logprob_entropy(h, w, lab[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprob_entropy(h, w, lab, temperature=0.0)
    with pytest.raises(ValueError, match="dtypes"):
        token_logprob_entropy(h, w.double(), lab)
    with pytest.raises(ValueError, match="token_block"):
        token_logprob_entropy(h, w, lab, token_block=0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        token_logprob_entropy(h, w, lab, vocab_chunk=0)


# ------------------------------------------------------------------------------------- TP = 2

def _tp_body(rank, world_size, hidden, weight, labels, g_logp, g_ent, temperature, token_block):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    group = dist.new_group(list(range(world_size)))
    V_local = weight.shape[0] // world_size
    shard = weight[rank * V_local:(rank + 1) * V_local]
    out = {}
    for backend in ("torch", "triton", "ref"):
        fn = token_logprob_entropy if backend != "ref" else token_logprob_entropy_ref
        kw = dict(token_block=token_block, vocab_chunk=100, backend=backend) if backend != "ref" else {}
        out[backend] = _run(fn, hidden, shard, labels, g_logp, g_ent, tp_group=group, vocab_start=rank * V_local,
                            temperature=temperature, **kw)
    return out


def test_tensor_parallel_two_ranks():
    """2 gloo ranks, each holding half the vocab rows (257 each, in vocab chunks of 100), vs one device."""
    T, H, V, temperature, token_block = 33, 32, 514, 0.8, 16
    args = _inputs(T, H, V, seed=5)
    want = _run(token_logprob_entropy_ref, *args, temperature=temperature)
    results = run_distributed(_tp_body, 2, *args, temperature, token_block, timeout=180)
    for rank, out in enumerate(results):
        for backend, (logp, ent, g_h, g_w) in out.items():
            shard = slice(rank * V // 2, (rank + 1) * V // 2)
            _close((logp, ent, g_h, g_w), (want[0], want[1], want[2], want[3][shard]), FP32_TOL)


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference(dtype):
    T, H, V = 1537, 512, 50257
    args = _inputs(T, H, V, scale=0.2, dtype=dtype, device="cuda")
    got = _run(token_logprob_entropy, *args, temperature=0.9, token_block=512, vocab_chunk=4096, backend="triton")
    want = _run(token_logprob_entropy_ref, *args, temperature=0.9)
    if dtype == torch.float32:
        _close(got, want, dict(atol=1e-4, rtol=1e-4))
    else:
        _close(got[:2], want[:2], BF16_VAL_TOL)
        for a, b in zip(got[2:], want[2:]):
            torch.testing.assert_close(a.float(), b.float(), **BF16_GRAD_TOL)
