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
    torch's default generator (broadcast from tensor-parallel rank 0). ``repeat_detector_factory``
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


def sample_batch(
    logits_BV: torch.Tensor,
    temperatures: List[float],
    top_ks: List[int],
    top_ps: List[float],
    uniforms: List[Optional[float]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row. ``uniforms[i]`` is None for greedy rows.

    Returns (tokens [B] int64, logprobs [B] fp32 of the raw policy, sampling logprobs [B] fp32).
    """
    logits = logits_BV.float()
    B, V = logits.shape
    logp_BV = torch.log_softmax(logits, dim=-1)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    samp_lp = torch.zeros(B, dtype=torch.float32, device=logits.device)

    greedy_rows = [i for i, u in enumerate(uniforms) if u is None]
    sampled_rows = [i for i, u in enumerate(uniforms) if u is not None]
    if len(greedy_rows) == B:
        tokens = logits.argmax(dim=-1)
    else:
        if greedy_rows:
            g = torch.tensor(greedy_rows, device=logits.device)
            tokens[g] = logits[g].argmax(dim=-1)
        all_sampled = len(sampled_rows) == B
        s = None if all_sampled else torch.tensor(sampled_rows, device=logits.device)
        sub = logits if all_sampled else logits[s]
        dev = logits.device
        temp = torch.tensor([temperatures[i] for i in sampled_rows], dtype=torch.float32, device=dev)
        scaled = sub / temp[:, None]
        sorted_l, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        keep = torch.ones_like(sorted_l, dtype=torch.bool)
        ks = [top_ks[i] for i in sampled_rows]
        if any(k > 0 for k in ks):
            k_t = torch.tensor([k if k > 0 else V for k in ks], device=dev)
            keep &= torch.arange(V, device=dev)[None, :] < k_t[:, None]
        ps = [top_ps[i] for i in sampled_rows]
        if any(p < 1.0 for p in ps):
            probs = torch.softmax(sorted_l.masked_fill(~keep, float("-inf")), dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
            p_t = torch.tensor(ps, dtype=torch.float32, device=dev)
            keep &= before < p_t[:, None]
            keep[:, 0] = True
        lsm = torch.log_softmax(sorted_l.masked_fill(~keep, float("-inf")), dim=-1)
        cdf = torch.cumsum(lsm.double().exp(), dim=-1)
        u = torch.tensor([uniforms[i] for i in sampled_rows], dtype=torch.float64, device=dev)
        target = (u * cdf[:, -1]).unsqueeze(1)
        j = torch.searchsorted(cdf, target, right=True)
        j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)
        tok = order.gather(1, j).squeeze(1)
        slp = lsm.gather(1, j).squeeze(1)
        if all_sampled:
            tokens, samp_lp = tok, slp
        else:
            tokens[s] = tok
            samp_lp[s] = slp
    logprobs = logp_BV.gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs, samp_lp
