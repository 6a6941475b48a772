"""Context parallelism (CP) for packed THD batches, without Transformer Engine.

**Split (load-balanced zig-zag).** Every sample of a pack is padded to a multiple of 2·CP (the
packer does it: ``pad_to_multiple``) and cut into 2·CP equal chunks; CP rank r holds chunks r and
2·CP−1−r of *every* sample, in that order, so each rank gets the same share of causal work.
:func:`split_batch_for_cp` applies this to the micro-batch (tokens, labels, loss mask, position ids)
before the model; ``PackedSeqParams`` keeps the *global* padded ``cu_seqlens`` (Megatron's THD RoPE
divides them by CP and picks each chunk's frequencies from the token's position within its own
sample; tests/parallel/test_context_parallel.py checks the result against CP=1).

**Attention: all-gather of K/V, not a ring.** :func:`cp_attention_thd` all-gathers this layer's K
and V over the CP group, rebuilds for each local query chunk c the keys of its sample's prefix
(chunks 0..c), and runs ONE varlen attention call whose causal mask is bottom-right aligned
(query i of a chunk of length C over a prefix of length (c+1)·C sees keys j ≤ i + c·C). Why:
(1) packed batches hold many samples of uneven lengths; a ring must mask and skip blocks per sample
at every one of its CP steps, while the gather turns CP into one ordinary varlen call (same kernel,
same masks as CP=1); (2) with GQA the gathered K/V are small (KV heads ≪ query heads: 8 of 40-64
for 7B-32B models), so the extra memory is ~2·T·Hkv·D per layer and the traffic one all-gather
(+ one reduce-scatter in backward) per layer, which the ring does not reduce (it moves the same
bytes in CP−1 steps); (3) the backward is autograd through a gather: dK/dV are scattered back
to their owners by the all-gather's backward (a reduce-scatter), nothing hand-written to get wrong.
Llama 3 trains 128k with the same all-gather CP for the same reasons. The attention call itself is
:func:`megatron_kimi.model.packed_attention.packed_attention` (Triton on GPU, PyTorch on CPU).

**Images (a VLM).** A micro-batch's ``images`` are not split: every CP rank runs the whole vision
tower and takes, through the per-token feature index (split here like the tokens), the feature rows of
its own placeholder positions; the tower's grads are then summed over DP×CP by DDP like the LM's.

Loss and token counts need nothing here: per-token losses are summed and the counts all-reduced
over data-parallel × CP by Megatron (``calculate_per_token_loss``), and DDP reduces grads over DP×CP.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

_SPLIT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

# Host copies of cu_seqlens tensors. Every layer (and its recompute) passes the same tensor, and on a
# GPU each ``.tolist()`` is a device sync: one copy per micro-batch instead of one per layer. Weakly
# keyed by identity (an entry dies with its tensor); ``_version`` catches in-place edits.
_HOST_BOUNDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def host_bounds(cu: torch.Tensor) -> Tuple[int, ...]:
    """``tuple(cu.tolist())``, copied from the device once per tensor (and version)."""
    version, bounds = _HOST_BOUNDS.get(cu, (None, None))
    if version != cu._version:
        bounds = tuple(int(x) for x in cu.tolist())
        _HOST_BOUNDS[cu] = (cu._version, bounds)
    return bounds


def _lengths(cu: List[int]) -> List[int]:
    return [e - s for s, e in zip(cu[:-1], cu[1:])]


@functools.lru_cache(maxsize=64)
def zigzag_indices(cu_padded: Tuple[int, ...], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices CP rank ``cp_rank`` holds, in its local order (int64)."""
    parts = []
    for start, length in zip(cu_padded[:-1], _lengths(list(cu_padded))):
        if length % (2 * cp_size):
            raise ValueError(f"a packed sample of length {length} is not padded to a multiple of 2*CP="
                             f"{2 * cp_size} (pack with pad_to_multiple=2*parallel.context)")
        c = length // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_batch_for_cp(batch: Dict[str, object], cp_size: int, cp_rank: int) -> Dict[str, object]:
    """This CP rank's share of a THD micro-batch ([1, T] tensors -> [1, T/CP]); other keys unchanged."""
    if cp_size == 1:
        return batch
    params = batch.get("packed_seq_params")
    if params is None or params.qkv_format != "thd":
        raise ValueError("context parallelism needs packed THD micro-batches (packed_seq_params, qkv_format='thd')")
    cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    cu_list = host_bounds(cu)
    total = batch["tokens"].shape[-1]
    if cu_list[-1] != total:
        raise ValueError(f"packed cu_seqlens end at {cu_list[-1]} but the micro-batch has {total} tokens")
    idx = zigzag_indices(cu_list, cp_size, cp_rank)
    out = dict(batch)
    for key in _SPLIT_KEYS:
        if key in batch and batch[key] is not None:
            out[key] = batch[key].index_select(-1, idx.to(batch[key].device))
    images = batch.get("images")
    if images is not None:
        if images.token_index_BS is None:
            raise ValueError("context parallelism: images need a per-token feature index (token_index_BS)")
        out["images"] = dataclasses.replace(images, token_index_BS=images.token_index_BS.index_select(
            -1, idx.to(images.token_index_BS.device)))
    return out


class _AllGatherFirstDim(torch.autograd.Function):
    """Concatenate every rank's [t, ...] along dim 0; backward: each rank gets the sum of the
    gradients of its own rows (a reduce-scatter; gloo has none, so all-reduce + slice there)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n].clone(), None


def all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherFirstDim.apply(x, group)


@functools.lru_cache(maxsize=64)
def _prefix_plan(cu_padded: Tuple[int, ...], cp_size: int, cp_rank: int):
    """For the all-gathered K/V ([CP * t_local] rows, rank p's rows at p*t_local): the row index of
    each local query chunk's key prefix, and the varlen cu_seqlens of queries and keys."""
    t_local = cu_padded[-1] // cp_size
    rows, cu_q, cu_k = [], [0], [0]
    for start, length in zip(cu_padded[:-1], _lengths(list(cu_padded))):
        c = length // (2 * cp_size)
        local_start = start // cp_size

        def chunk_rows(chunk: int) -> torch.Tensor:
            owner = chunk if chunk < cp_size else 2 * cp_size - 1 - chunk
            offset = local_start + (0 if chunk < cp_size else c)
            base = owner * t_local + offset
            return torch.arange(base, base + c)

        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            rows.extend(chunk_rows(j) for j in range(chunk + 1))
            cu_q.append(cu_q[-1] + c)
            cu_k.append(cu_k[-1] + (chunk + 1) * c)
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return index, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)


def cp_attention_thd(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_padded: torch.Tensor,
                     softmax_scale: float, group, impl: str = "auto") -> torch.Tensor:
    """Causal packed attention of this rank's zig-zag chunks against their samples' full prefixes.

    q: [T/CP, Hq, D], k/v: [T/CP, Hkv, D] (this rank's rows); ``cu_padded``: the global padded
    cu_seqlens. Returns [T/CP, Hq, D].
    """
    from megatron_kimi.model.packed_attention import packed_attention

    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    cu = host_bounds(cu_padded)
    assert cu[-1] == q_THD.shape[0] * cp_size, (cu[-1], q_THD.shape, cp_size)
    index, cu_q, cu_k = _prefix_plan(cu, cp_size, cp_rank)
    device = q_THD.device
    kv = all_gather_first_dim(torch.cat([k_THD, v_THD], dim=1), group)  # one collective for K and V
    kv_prefix = kv.index_select(0, index.to(device))
    hk = k_THD.shape[1]
    k_pre, v_pre = kv_prefix[:, :hk], kv_prefix[:, hk:]
    max_q, max_k = (int(torch.diff(c).max()) if c.numel() > 1 else 0 for c in (cu_q, cu_k))  # host tensors
    return packed_attention(q_THD, k_pre, v_pre, cu_q.to(device), cu_k.to(device), scale=softmax_scale,
                            max_q=max_q, max_k=max_k, impl=impl)
