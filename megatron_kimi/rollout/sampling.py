"""Sampling parameters and the batched sampler (temperature, top-k, top-p, greedy).

Randomness is per request and counter-like: every request owns a ``random.Random(seed)`` that yields
one uniform number per sampled token, and the token is drawn by inverse-CDF over the request's own
(sorted, truncated) distribution. A request's tokens therefore depend only on its prompt, its
parameters and its seed -- not on which other requests share the batch, nor on the slot it got --
and every tensor-parallel rank draws the same numbers without any communication.

Returned per token:

* ``logprob``: ``log_softmax`` of the raw logits (temperature 1, no truncation) -- the policy's
  log pi(token), what the RL loss uses and what the trainer's forward computes.
* ``sampling_logprob``: the log-probability under the distribution actually sampled from (after
  temperature, top-k and top-p renormalisation; 0 for greedy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable the truncations.
    ``stop_token_ids`` add to the engine's ``eos_token_id``; ``stop_strings`` are checked on the
    decoded response (needs the engine's ``decode`` callable). ``seed=None`` draws a seed from
    torch's default generator, offset by the data-parallel rank (and broadcast from tensor-parallel
    rank 0); the seed used is reported in the result. ``repeat_detector_factory``
    builds, per request, an object whose ``update(token_id) -> bool`` returns True to stop the
    sequence with finish reason ``"repeat"``.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: Optional[int] = None
    repeat_detector_factory: Optional[Callable[[], object]] = field(default=None, repr=False)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_raw_policy(self) -> bool:
        """Sampling from exactly the model's distribution (so sampling logprobs = logprobs)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0


def _inverse_cdf(lsm: torch.Tensor, u: torch.Tensor, n_keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Index j with cdf[j-1] <= u * total < cdf[j] per row of log-probs ``lsm`` (fp64 CDF)."""
    cdf = torch.cumsum(lsm.double().exp(), dim=-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    limit = (n_keep.unsqueeze(1) if n_keep is not None else torch.full_like(j, lsm.shape[-1])) - 1
    return torch.minimum(j, limit)


_CANDIDATES = 64  # top-c candidates tried first for truncated sampling (else the full sort)


def _canonical_topk(scaled: torch.Tensor, c: int):
    """The c largest per row, ordered by (value desc, index asc) -- a stable descending sort's order."""
    if c >= scaled.shape[-1]:
        return torch.sort(scaled, dim=-1, descending=True, stable=True)
    vals, idx = torch.topk(scaled, c, dim=-1, sorted=False)
    idx, perm = torch.sort(idx, dim=-1)
    vals, perm = torch.sort(vals.gather(1, perm), dim=-1, descending=True, stable=True)
    return vals, idx.gather(1, perm)


def _sample_rows(logits: torch.Tensor, logp: torch.Tensor, temps, ks, ps, us):
    """Sample rows that all truncate (probability order) or all do not (vocabulary order)."""
    dev = logits.device
    V = logits.shape[-1]
    u = torch.tensor(us, dtype=torch.float64, device=dev)
    if all(t == 1.0 for t in temps):
        scaled = logits
    else:
        scaled = logits / torch.tensor(temps, dtype=torch.float32, device=dev)[:, None]
    if all(k == 0 for k in ks) and all(p >= 1.0 for p in ps):
        lsm = logp if scaled is logits else torch.log_softmax(scaled, dim=-1)
        tok = _inverse_cdf(lsm, u, None)
        return tok.squeeze(1), lsm.gather(1, tok).squeeze(1)
    # Truncation only ever keeps the most probable tokens: work on the top-c candidates (in the
    # order of a full stable sort); if some row's kept set does not lie strictly inside them, sort all.
    k_t = torch.tensor([k if k > 0 else V for k in ks], device=dev)
    p_t = torch.tensor(ps, dtype=torch.float32, device=dev)
    lse_full = torch.logsumexp(scaled, dim=-1, keepdim=True)
    c = min(V, max(_CANDIDATES, max(ks) + 1))
    while True:
        sorted_l, order = _canonical_topk(scaled, c)
        keep = torch.arange(c, device=dev)[None, :] < k_t[:, None]
        if any(p < 1.0 for p in ps):
            top_k_only = sorted_l.masked_fill(~keep, float("-inf"))
            # top-p over the top-k renormalised distribution (the full one where top_k = 0)
            lse = torch.where(k_t[:, None] < V, torch.logsumexp(top_k_only, dim=-1, keepdim=True), lse_full)
            probs = torch.exp(top_k_only - lse)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
            keep &= before < p_t[:, None]
            keep[:, 0] = True
        n_keep = keep.sum(-1)
        if c >= V:
            break
        last_kept = sorted_l.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1)
        if bool(((n_keep < c) & (last_kept > sorted_l[:, -1])).all()):
            break
        c = V
    lsm = torch.log_softmax(sorted_l.masked_fill(~keep, float("-inf")), dim=-1)
    j = _inverse_cdf(lsm, u, n_keep)
    return order.gather(1, j).squeeze(1), lsm.gather(1, j).squeeze(1)


def sample_batch(
    logits_BV: torch.Tensor,
    temperatures: List[float],
    top_ks: List[int],
    top_ps: List[float],
    uniforms: List[Optional[float]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row. ``uniforms[i]`` is None for greedy rows.

    Rows with a top-k / top-p truncation draw over their distribution sorted by probability (stable
    sort), the others over the vocabulary order; which path a row takes depends on its own
    parameters only, so a request's samples never depend on its batch-mates.

    Returns (tokens [B] int64, logprobs [B] fp32 of the raw policy, sampling logprobs [B] fp32).
    """
    logits = logits_BV.float()
    B = logits.shape[0]
    dev = logits.device
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.empty(B, dtype=torch.long, device=dev)
    samp_lp = torch.zeros(B, dtype=torch.float32, device=dev)
    greedy = [i for i in range(B) if uniforms[i] is None]
    if len(greedy) == B:
        tokens = logits.argmax(dim=-1)
    else:
        if greedy:
            g = torch.tensor(greedy, device=dev)
            tokens[g] = logits[g].argmax(dim=-1)
        truncating = [i for i in range(B) if uniforms[i] is not None and (top_ks[i] > 0 or top_ps[i] < 1.0)]
        plain = [i for i in range(B) if uniforms[i] is not None and not (top_ks[i] > 0 or top_ps[i] < 1.0)]
        for rows in (truncating, plain):
            if not rows:
                continue
            whole = len(rows) == B
            r = None if whole else torch.tensor(rows, device=dev)
            tok, slp = _sample_rows(logits if whole else logits[r], logp if whole else logp[r],
                                    [temperatures[i] for i in rows], [top_ks[i] for i in rows],
                                    [top_ps[i] for i in rows], [uniforms[i] for i in rows])
            if whole:
                tokens, samp_lp = tok, slp
            else:
                tokens[r] = tok
                samp_lp[r] = slp
    logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs, samp_lp
