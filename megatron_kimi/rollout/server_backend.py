"""An OpenAI-compatible vLLM server as the rollout backend (``rollout.engine: vllm_server``): disaggregated mode.

Where the server comes from:

* ``rollout.server_url`` empty: the backend starts one with this interpreter (``sys.executable -m
  vllm.entrypoints.openai.api_server``, so ``vllm`` must import here: ``.venv-vllm``) on a free local port,
  with the development endpoints on (``VLLM_SERVER_DEV_MODE=1``), waits for ``/health`` (at most
  ``rollout.server_start_timeout_s``; a server that exits first fails at once) and stops it on
  :meth:`VllmServerBackend.close` or a failed start (SIGTERM, then SIGKILL of its process group; it also
  gets SIGTERM if the trainer dies). Its output goes to ``vllm_server_rank{R}.log`` in ``log_dir`` (the
  run dir; default the temp dir), named in every error. One server per data-parallel replica (its TP
  leader's), as :class:`~megatron_kimi.rollout.vllm_backend.VllmBackend` has one engine per replica.
  The initial weights and ``config.json`` go to a fresh directory under ``/dev/shm`` (else the temp
  dir, or under ``rollout.server_weights_dir`` when set), removed on close.
* ``rollout.server_url: http://host:port``: a running server, shared by every data-parallel replica.
  It must have been started with ``VLLM_SERVER_DEV_MODE=1`` (checked at start: a ValueError naming the
  URL), with ``--skip-tokenizer-init --logprobs-mode processed_logprobs --generation-config vllm`` (not
  checkable from here), a ``--max-model-len`` above ``training.seq_length`` (checked) and on a model of
  the trainer's architecture: the ``config.json`` the backend writes into ``rollout.server_weights_dir``
  (the directory the weights go to; the server must be able to read it).

Requests: only the TP leader (TP rank 0) of each replica talks to the server; results are broadcast to
its TP group. One ``POST /v1/completions`` per request (token-id prompt, per-request seed, stop ids,
processed log-probs of the sampled tokens, ``return_token_ids``), sent from a pool of
``rollout.max_batch_size`` threads so that the server batches them. An attempt that fails (connection
error, HTTP 5xx / 408 / 429, a malformed answer) or gets no answer within ``rollout.request_timeout_s`` is
retried ``rollout.request_retries`` times with exponential backoff; then the request is **dropped**: its
result has finish reason ``"dropped"`` (:data:`~megatron_kimi.rollout.backend.DROPPED`) and no tokens, and
is counted (``dropped`` in total, ``last_dropped`` in the last call). Any other HTTP 4xx (a request the
server refuses) is dropped without retries. Nothing waits unboundedly: each call also has an overall
deadline (:meth:`ServerRollout.deadline_s`), and ``/health`` is checked before each call (a server that
does not answer it within ``request_timeout_s``: a RuntimeError naming the URL and the log file).

Log-probs, finish reasons, repeat detection and the unsupported ``stop_strings``: as :class:`VllmBackend`.
``logprobs`` are the raw policy's; for truncated sampling (temperature != 1, top-k, top-p) vLLM's
processed log-probs become ``sampling_logprobs`` and ``logprobs`` come from a teacher-forced
``prompt_logprobs`` request over prompt + response, sent as soon as the sample is back (a sample whose
rescoring fails is dropped too). The server therefore runs with ``--max-model-len`` = ``max_seq_len + 1``:
a full-length sample still fits its rescoring request.

Weight sync (:meth:`VllmServerBackend.update_weights`): the TP group exports the trainer's weights
(:func:`~megatron_kimi.rollout.vllm_backend.megatron_to_hf_tensors`, collective) into bucketed
safetensors files (the leader writes), then ``POST /collective_rpc {"method": "reload_weights", "kwargs":
{"weights_path": DIR}}`` and ``POST /reset_prefix_cache``, whose ``{"success": true}`` is required (retried
while it is false, then a RuntimeError): without the reset, a prompt sharing a cached prefix would reuse KV
computed by the old weights. Then ``weight_version += 1``; ``last_sync_s`` / ``last_sync_bytes`` /
``last_sync_gbps`` time it. With a shared server (URL) only data-parallel rank 0's TP group exports and
reloads; every rank then gets its outcome (a broadcast from rank 0).

``release()`` / ``resume(tags)``: vLLM's sleep mode (``POST /sleep?level=``, ``POST /wake_up?tags=``) for a
server this backend started, on CUDA. On CPU (sleep mode is CUDA-only) and for a server given by URL
(it runs elsewhere: sleeping it frees nothing for the trainer) they only keep the protocol's state
(logged once).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import as_completed
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_kimi.config import ModelConfig
from megatron_kimi.rollout.backend import DROPPED, TAGS, WEIGHTS, check_tags
from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult, check_requests, draw_seeds
from megatron_kimi.rollout.server_process import ServerProcess, free_port, server_argv, server_env
from megatron_kimi.rollout.vllm_backend import (
    _DTYPES,
    eager_mode,
    engine_result,
    eos_id_list,
    broadcast_from_tp_leader,
    hf_export_config,
    is_tp_leader,
    megatron_to_hf_tensors,
    vllm_available,
    write_safetensors_buckets,
)

log = logging.getLogger(__name__)

__all__ = ["VllmServerBackend", "ServerClient", "ServerRollout", "RequestFailed",
           "launch_server", "connect"]

_RETRYABLE_STATUS = (408, 429)  # and every 5xx
_MAX_BACKOFF_S = 10.0
# Inherited variables that would make the server's own torch.distributed / launch logic think it is a
# rank of the trainer's job.
class RequestFailed(Exception):
    """An HTTP exchange that failed (after ``attempts`` attempts); ``status``: the HTTP status if any."""

    def __init__(self, message: str, retryable: bool = True, status: Optional[int] = None, attempts: int = 1):
        super().__init__(message)
        self.retryable, self.status, self.attempts = retryable, status, attempts


# ---------------------------------------------------------------------------------------- HTTP client

class ServerClient:
    """JSON over HTTP to one vLLM server (standard library only; proxies ignored). Every attempt has a
    timeout (``timeout_s``); :meth:`call` retries a failed one ``retries`` times, after ``backoff_s``,
    then twice that, ... (at most 10 s). Thread-safe: the rollout pool shares one client."""

    def __init__(self, url: str, *, timeout_s: float = 120.0, retries: int = 2, backoff_s: float = 0.5,
                 log_path: Optional[Path] = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"a vLLM server URL must look like http://host:port, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.log_path = log_path
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def where(self) -> str:
        """``the vLLM server at URL`` (and its log file), for error messages."""
        return f"the vLLM server at {self.url}" + (f" (its log: {self.log_path})" if self.log_path else "")

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1, 2, ...)."""
        return min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)

    def call_bound_s(self) -> float:
        """The longest a :meth:`call` can take: every attempt timing out, plus the backoffs."""
        return (self.retries + 1) * self.timeout_s + sum(self.backoff(a) for a in range(1, self.retries + 1))

    def attempt(self, method: str, path: str, body=None, *, timeout: Optional[float] = None,
                parse: Optional[Callable] = None):
        """One request: the decoded JSON answer (None for an empty body), through ``parse`` if given.
        Raises :class:`RequestFailed` (``retryable`` for connection errors, timeouts, 5xx / 408 / 429 and
        answers ``parse`` rejects)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with self._opener.open(req, timeout=self.timeout_s if timeout is None else timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()[:400].decode(errors="replace")
            except Exception:  # noqa: BLE001 -- the status says enough
                detail = ""
            retryable = e.code >= 500 or e.code in _RETRYABLE_STATUS
            raise RequestFailed(f"HTTP {e.code} {detail}".strip(), retryable, status=e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out
            reason = getattr(e, "reason", None) or e
            raise RequestFailed(f"{type(e).__name__}: {reason}", True) from None
        try:
            doc = json.loads(raw) if raw.strip() else None
            return parse(doc) if parse is not None else doc
        except Exception as e:  # noqa: BLE001 -- a malformed answer: worth another attempt
            raise RequestFailed(f"malformed answer ({type(e).__name__}: {e}): {raw[:200]!r}", True) from None

    def call(self, method: str, path: str, body=None, *, parse: Optional[Callable] = None,
             retries: Optional[int] = None, timeout: Optional[float] = None) -> Tuple[object, int]:
        """:meth:`attempt` with retries: (answer, failed attempts before it). Raises :class:`RequestFailed`
        (``attempts``: how many were made) once they are used up, or at once if not retryable."""
        attempts = 1 + (self.retries if retries is None else int(retries))
        for a in range(attempts):
            if a:
                time.sleep(self.backoff(a))
            try:
                return self.attempt(method, path, body, timeout=timeout, parse=parse), a
            except RequestFailed as e:
                last = e
                if not e.retryable:
                    break
        raise RequestFailed(f"{method} {path}: {last} (attempt {a + 1} of {attempts})", False, last.status,
                            attempts=a + 1)

    def rpc(self, method: str, path: str, body=None, *, parse: Optional[Callable] = None):
        """:meth:`call` for the control endpoints: the answer, or a RuntimeError naming the server."""
        try:
            return self.call(method, path, body, parse=parse)[0]
        except RequestFailed as e:
            raise RuntimeError(f"{self.where()}: {e}") from None

    # ---- health and the development endpoints

    def wait_healthy(self, within_s: float, process: Optional["ServerProcess"] = None,
                     what: str = "answer GET /health") -> None:
        """Until ``GET /health`` answers 200, at most ``within_s`` seconds (then a RuntimeError naming the
        server and its log). ``process``: a server we started; if it exits, fail at once (with its log's tail)."""
        deadline = time.monotonic() + within_s
        last: object = None
        while True:
            if process is not None:
                process.check_running(self.url)
            left = deadline - time.monotonic()
            try:
                self.attempt("GET", "/health", timeout=max(0.2, min(5.0, left)))
                return
            except RequestFailed as e:
                last = e
            left = deadline - time.monotonic()
            if left <= 0:
                tail = process.log_tail() if process is not None else ""
                raise RuntimeError(f"{self.where()} did not {what} within {within_s:g}s (last: {last})"
                                   + (f"; the log ends with:\n{tail}" if tail else ""))
            time.sleep(min(0.5, left))

    def check_dev_mode(self) -> None:
        """ValueError naming the URL when the server lacks the development endpoints (``/collective_rpc``,
        ``/reset_prefix_cache``, ``/sleep``: ``VLLM_SERVER_DEV_MODE=1``); probed with ``GET /is_sleeping``."""
        try:
            self.call("GET", "/is_sleeping", parse=lambda d: bool(d["is_sleeping"]))
        except RequestFailed as e:
            if e.status == 404:
                raise ValueError(f"the vLLM server at {self.url} has no development endpoints (GET /is_sleeping: "
                                 "404), which the weight sync needs (/collective_rpc, /reset_prefix_cache): start "
                                 "it with VLLM_SERVER_DEV_MODE=1 in its environment") from None
            raise RuntimeError(f"{self.where()}: {e}") from None

    def served_model(self) -> Tuple[str, Optional[int]]:
        """(model id, max_model_len) of the first model ``GET /v1/models`` lists."""
        card = self.rpc("GET", "/v1/models", parse=lambda d: d["data"][0])
        return str(card["id"]), (None if card.get("max_model_len") is None else int(card["max_model_len"]))

    def reload_weights(self, weights_dir) -> None:
        self.rpc("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights_dir)}})

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``success``: False while blocks are held (requests running)."""
        return self.rpc("POST", "/reset_prefix_cache", parse=lambda d: bool(d["success"]))

    def sleep(self, level: int) -> None:
        self.rpc("POST", f"/sleep?level={int(level)}")

    def wake_up(self, tags: Sequence[str]) -> None:
        self.rpc("POST", "/wake_up?" + urllib.parse.urlencode([("tags", t) for t in tags]))


# ---------------------------------------------------------------------------- requests -> results

def _parse_completion(doc) -> Tuple[List[int], List[float], str]:
    """(token ids, log-probs of the sampled tokens, finish reason) of a /v1/completions answer."""
    c = doc["choices"][0]
    ids = [int(t) for t in c["token_ids"]]
    lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
    if len(lps) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(lps)} log-probs")
    if c["finish_reason"] not in ("stop", "length"):  # "abort" (server shutting down), None, ...
        raise ValueError(f"finish_reason {c['finish_reason']!r}")
    return ids, lps, c["finish_reason"]


def _logprob(entry) -> float:
    return float(entry["logprob"] if isinstance(entry, dict) else entry)


def _parse_prompt_logprobs(doc, start: int, ids: Sequence[int]) -> List[float]:
    """log pi of ``ids`` at positions ``start, start + 1, ...`` of a teacher-forced ``prompt_logprobs``
    answer (``[None, {"token": {"logprob": ...}}, ...]`` per position; JSON keys are strings)."""
    plp = doc["choices"][0]["prompt_logprobs"]
    return [_logprob(plp[start + j][str(int(t))]) for j, t in enumerate(ids)]


def _dropped(r: GenerationRequest, seed: int) -> GenerationResult:
    return GenerationResult(r.request_id, list(r.prompt_ids), [], [], DROPPED,
                            sampling_logprobs=None if r.params.is_raw_policy else [], seed=seed)


class ServerRollout:
    """:class:`GenerationRequest` s -> ``/v1/completions`` -> :class:`GenerationResult` s through a
    :class:`ServerClient`: the TP leader's side of :class:`VllmServerBackend` (see the module docstring).

    Args:
        client: the server's client (timeout, retries).
        model_name: the served model's id (``GET /v1/models``).
        max_seq_len: prompt + response capacity (the server's ``--max-model-len`` is one more).
        vocab_size: token ids must be below it (the padded vocabulary).
        eos_token_id: an id (or ids) that ends every request with finish reason "stop".
        max_workers: requests in flight at once.
        slack_s: added to the overall deadline of a call.
    """

    def __init__(self, client: ServerClient, *, model_name: str, max_seq_len: int, vocab_size: int,
                 eos_token_id=None, max_workers: int = 64, slack_s: float = 10.0):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.client = client
        self.model_name = model_name
        self.max_seq_len = int(max_seq_len)
        self.vocab_size = int(vocab_size)
        self.eos_ids = eos_id_list(eos_token_id)
        self.max_workers = int(max_workers)
        self.slack_s = float(slack_s)
        self.pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="vllm-server-request")
        self.dropped = 0  # requests dropped over this object's life
        self.last_dropped = 0  # ... in the last generate call
        self.last_retried = 0  # requests of the last call that succeeded after a failed attempt
        self.last_failed_attempts = 0

    def deadline_s(self, n: int) -> float:
        """The longest :meth:`generate` waits for ``n`` requests: ``ceil(n / max_workers)`` waves of one
        request's worst case (its completion call and its rescoring call, each with every attempt timing
        out), plus ``slack_s``. Requests still unanswered then are dropped."""
        waves = math.ceil(n / self.max_workers) if n else 0
        return waves * 2 * self.client.call_bound_s() + self.slack_s

    # ---- bodies

    def completion_body(self, r: GenerationRequest, seed: int, max_tokens: int) -> dict:
        p = r.params
        return {"model": self.model_name, "prompt": [int(t) for t in r.prompt_ids], "max_tokens": int(max_tokens),
                "temperature": float(p.temperature), "top_p": float(p.top_p),
                "top_k": int(p.top_k) if p.top_k > 0 else 0, "seed": None if p.greedy else int(seed),
                "logprobs": 0, "stop_token_ids": sorted(set(self.eos_ids) | {int(t) for t in p.stop_token_ids}),
                "ignore_eos": True, "skip_special_tokens": False,
                "return_token_ids": True, "return_tokens_as_token_ids": True}

    def score_body(self, prompt: Sequence[int], output: Sequence[int]) -> dict:
        """Teacher-forced: one token is generated (greedy), the prompt's log-probs are what counts."""
        return {"model": self.model_name, "prompt": [int(t) for t in prompt] + [int(t) for t in output],
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "ignore_eos": True,
                "skip_special_tokens": False, "return_tokens_as_token_ids": True}

    # ---- generation

    def _seeds(self, requests) -> List[int]:
        """The request's seed, else one drawn as the built-in engine draws it."""
        drawn = iter(draw_seeds(sum(r.params.seed is None for r in requests)).tolist())
        return [int(r.params.seed) if r.params.seed is not None else int(next(drawn)) for r in requests]

    def _rescore(self, prompt, output) -> Tuple[List[float], int]:
        return self.client.call("POST", "/v1/completions", self.score_body(prompt, output),
                                parse=lambda d: _parse_prompt_logprobs(d, len(prompt), output))

    def _one(self, r: GenerationRequest, seed: int, limit: int):
        """(result, failed attempts, error or None); a request that failed is returned dropped."""
        failed = 0
        try:
            (ids, lps, finish), failed = self.client.call("POST", "/v1/completions",
                                                          self.completion_body(r, seed, limit), parse=_parse_completion)
            res = engine_result(r, ids, lps, finish, seed)
            if res.sampling_logprobs and not r.params.greedy:  # truncated sampling: raw log-probs by rescoring
                res.logprobs, f = self._rescore(res.prompt_ids, res.output_ids)
                failed += f
            return res, failed, None
        except RequestFailed as e:
            return _dropped(r, seed), failed + e.attempts, str(e)

    def generate(self, requests: Sequence[GenerationRequest],
                 on_result: Optional[Callable[[GenerationResult], None]] = None) -> List[GenerationResult]:
        """One result per request, same order; ``on_result`` is called (in this thread) with each as soon
        as it is final. Returns within :meth:`deadline_s` (+ the checks); failures come back dropped."""
        requests = list(requests)
        check_requests(requests, self.max_seq_len, self.vocab_size)
        for r in requests:
            if r.params.stop_strings:
                raise ValueError(f"request {r.request_id!r}: stop_strings are not supported by the vLLM server "
                                 "backend (no tokenizer in the engine)")
        seeds = self._seeds(requests)
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        futures = {}
        for i, r in enumerate(requests):
            limit = min(r.params.max_new_tokens, self.max_seq_len - len(r.prompt_ids))
            if limit <= 0:  # nothing to generate: as VllmBackend, without asking the server
                results[i] = GenerationResult(r.request_id, list(r.prompt_ids), [], [], "length",
                                              sampling_logprobs=None if r.params.is_raw_policy else [], seed=seeds[i])
                if on_result is not None:
                    on_result(results[i])
            else:
                futures[self.pool.submit(self._one, r, seeds[i], limit)] = i
        dropped = retried = failed_attempts = 0
        errors: List[str] = []
        try:
            for fut in as_completed(futures, timeout=self.deadline_s(len(futures))):
                i = futures[fut]
                res, failed, error = fut.result()
                failed_attempts += failed
                if error is not None:
                    dropped += 1
                    errors.append(f"request {requests[i].request_id!r}: {error}")
                elif failed:
                    retried += 1
                results[i] = res
                if on_result is not None:
                    on_result(res)
        except FutureTimeout:  # past the deadline: whatever is left is dropped (its thread times out later)
            for fut, i in futures.items():
                if results[i] is None:
                    fut.cancel()
                    dropped += 1
                    errors.append(f"request {requests[i].request_id!r}: no answer within the call's deadline")
                    results[i] = _dropped(requests[i], seeds[i])
                    if on_result is not None:
                        on_result(results[i])
        self.last_dropped, self.last_retried, self.last_failed_attempts = dropped, retried, failed_attempts
        self.dropped += dropped
        if dropped:
            log.warning("%s: %d of %d requests dropped (first: %s)", self.client.where(), dropped, len(requests),
                        "; ".join(errors[:3]))
        return results  # type: ignore[return-value]

    def score(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> List[List[float]]:
        """Raw-policy log-probs of ``outputs[i]`` after ``prompts[i]`` (teacher-forced); a RuntimeError if
        one fails (a diagnostic, not the rollout path)."""
        futs = [self.pool.submit(self._rescore, list(p), list(o)) for p, o in zip(prompts, outputs)]
        try:
            return [f.result(timeout=self.deadline_s(len(futs)))[0] for f in futs]
        except RequestFailed as e:
            raise RuntimeError(f"{self.client.where()}: scoring failed: {e}") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def launch_server(argv: Sequence[str], url: str, log_path, *, start_timeout_s: float = 300.0,
                  env: Optional[Dict[str, str]] = None, **client_kwargs) -> Tuple[ServerProcess, ServerClient]:
    """Start ``argv`` and wait (at most ``start_timeout_s``) until ``url`` answers ``GET /health``; a
    server that exits or times out is stopped and reported (RuntimeError naming the URL and the log)."""
    process = ServerProcess(argv, log_path, env)
    client = ServerClient(url, log_path=process.log_path, **client_kwargs)
    try:
        client.wait_healthy(start_timeout_s, process, what="start (answer GET /health)")
    except BaseException:
        process.close()
        raise
    return process, client


def connect(client: ServerClient, *, start_timeout_s: float, max_seq_len: int,
            process: Optional[ServerProcess] = None) -> str:
    """Check a server before use: healthy within ``start_timeout_s``, with the development endpoints
    (ValueError naming the URL), serving a model long enough for ``max_seq_len`` tokens + one (the
    rescoring request). Returns the served model's id."""
    client.wait_healthy(start_timeout_s, process, what="answer GET /health")
    client.check_dev_mode()
    name, max_model_len = client.served_model()
    if max_model_len is not None and max_model_len < max_seq_len + 1:
        raise ValueError(f"the vLLM server at {client.url} serves max_model_len={max_model_len}; the rollout needs "
                         f"{max_seq_len + 1} (training.seq_length={max_seq_len}, plus one position for the "
                         f"log-prob rescoring request): restart it with --max-model-len {max_seq_len + 1} (and "
                         "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if that is one more than the model's "
                         "max_position_embeddings: the extra position is never computed)")
    return name


# ------------------------------------------------------------------------------------ the backend

def _dp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0


def _world_broadcast(obj):
    """Global rank 0's ``obj`` on every rank (identity without a process group of more than one rank)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class VllmServerBackend:
    """A :class:`~megatron_kimi.rollout.backend.RolloutBackend` on an OpenAI-compatible vLLM server (see
    the module docstring).

    Args:
        model: the trainer's model (chunk list, or one GPTModel / wrapper).
        model_cfg: its :class:`ModelConfig` (the served HF architecture).
        max_seq_len: prompt + response capacity.
        max_batch_size: requests in flight at once (the thread pool; a started server's ``--max-num-seqs``).
        eos_token_id: an id (or ids) that ends every request with finish reason "stop".
        seed: a started server's ``--seed`` (requests carry their own).
        dtype: of the exported weights and a started server ("float32" / "bfloat16" / "float16").
        sync_bucket_mb: the largest safetensors file of a weight sync.
        url: a running server (``rollout.server_url``); empty: start one.
        weights_dir: with ``url``: where the weights go (the server must read it; required). Without: the
            base directory of the fresh weights directory (default ``/dev/shm``, else the temp dir).
        request_timeout_s / request_retries / backoff_s: per HTTP attempt; retries before dropping.
        start_timeout_s: how long a server may take to answer ``/health`` at start.
        log_dir: where a started server's log goes (default: the temp dir).
        server_args: more arguments for a started server (last: they override).
        sleep_level / gpu_memory_utilization: a started server's sleep mode and GPU share (CUDA).
        enforce_eager: a started server's ``--enforce-eager``; None: eager on CPU, CUDA graphs on CUDA.
    """

    def __init__(self, model, model_cfg: ModelConfig, *, max_seq_len: int, max_batch_size: int = 64,
                 eos_token_id=None, seed: int = 0, dtype: str = "float32", sync_bucket_mb: float = 512,
                 url: str = "", weights_dir: Optional[str] = None, request_timeout_s: float = 120.0,
                 request_retries: int = 2, backoff_s: float = 0.5, start_timeout_s: float = 300.0,
                 log_dir: Optional[str] = None, server_args: Sequence[str] = (), sleep_level: int = 1,
                 gpu_memory_utilization: float = 0.5, enforce_eager: Optional[bool] = None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if url and not weights_dir:
            raise ValueError(f"rollout.server_url={url}: set rollout.server_weights_dir to a directory the server "
                             "can read (the weight sync writes safetensors there)")
        if not url and not vllm_available():
            raise ValueError("rollout.engine=vllm_server without rollout.server_url starts a vLLM server with this "
                             "interpreter, which needs vllm importable: build its environment with `make venv-vllm` "
                             "and run with .venv-vllm/bin/python (or give rollout.server_url)")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        self.max_seq_len = int(max_seq_len)
        self.max_batch_size = int(max_batch_size)
        self.eos_token_id = eos_token_id
        self.sync_bucket_bytes = int(float(sync_bucket_mb) * 2**20)
        if self.sync_bucket_bytes <= 0:
            raise ValueError(f"sync_bucket_mb must be > 0, got {sync_bucket_mb}")
        self.url = url.rstrip("/")
        self.external = bool(url)
        self.weight_version = 0
        self.last_sync_s: Optional[float] = None
        self.last_sync_gbps: Optional[float] = None
        self.last_sync_bytes = 0
        self.dropped = 0  # requests dropped over the backend's life (every TP rank)
        self.last_dropped = 0  # ... in the last generate call
        self.asleep: set = set()
        self.sleep_level = int(sleep_level)
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.enforce_eager = eager_mode(enforce_eager)
        self.sleeps = not self.external and torch.cuda.is_available()  # see the module docstring
        self._noted_sleep = False
        self.hf_config, self.arch = hf_export_config(model, model_cfg, self.dtype, "rollout.engine=vllm_server")
        self.leader = is_tp_leader()
        # Which TP groups export and reload: each replica its own server; a shared server: replica 0's.
        self.syncs = not self.external or _dp_rank() == 0
        self.client: Optional[ServerClient] = None
        self.rollout: Optional[ServerRollout] = None
        self.process: Optional[ServerProcess] = None
        self.dir: Optional[Path] = None
        self._owns_dir = False
        self.log_path: Optional[Path] = None
        self.start_s = 0.0
        self._timeouts = dict(timeout_s=request_timeout_s, retries=request_retries, backoff_s=backoff_s)
        t0 = time.perf_counter()
        try:
            self._on_leader(self._make_dir, weights_dir)
            if not self.external:  # the server starts on the trainer's current weights
                nbytes, error = self._export(model)
                self._on_leader(self._raise, error)
                self.last_sync_bytes = nbytes
            self.url, self.log_path = self._on_leader(self._start, seed, start_timeout_s, log_dir, list(server_args))
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    # ---- set-up (TP leader)

    def _make_dir(self, weights_dir: Optional[str]) -> None:
        if self.external:
            self.dir = Path(weights_dir)
            if self.syncs:
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / "config.json").write_text(json.dumps(self.hf_config, indent=2))
            return
        if weights_dir:
            Path(weights_dir).mkdir(parents=True, exist_ok=True)
            base = weights_dir
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="kimi-vllm-server-", dir=base))
        self._owns_dir = True
        (self.dir / "config.json").write_text(json.dumps(self.hf_config, indent=2))

    def _start(self, seed: int, start_timeout_s: float, log_dir: Optional[str], server_args: List[str]):
        """Start the server (or check the given one) and set up the client; returns (URL, log path)."""
        if self.external:
            self.client = ServerClient(self.url, **self._timeouts)
        else:
            cuda = torch.cuda.is_available()
            port = free_port()
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.log_path = Path(log_dir or tempfile.gettempdir()) / f"vllm_server_rank{rank}.log"
            argv = server_argv(self.dir, port, max_model_len=self.max_seq_len + 1, max_batch_size=self.max_batch_size,
                               dtype=self.dtype_name, seed=seed, cuda=cuda, enforce_eager=self.enforce_eager,
                               gpu_memory_utilization=self.gpu_memory_utilization, extra=server_args)
            self.url = f"http://127.0.0.1:{port}"
            self.process, self.client = launch_server(argv, self.url, self.log_path, start_timeout_s=start_timeout_s,
                                                      env=server_env(cuda), **self._timeouts)
            log.info("vLLM server up at %s (log %s)", self.url, self.log_path)
        name = connect(self.client, start_timeout_s=start_timeout_s, max_seq_len=self.max_seq_len,
                       process=self.process)
        self.rollout = ServerRollout(self.client, model_name=name, max_seq_len=self.max_seq_len,
                                     vocab_size=self.arch.padded_vocab_size, eos_token_id=self.eos_token_id,
                                     max_workers=self.max_batch_size)
        return self.url, self.log_path

    @staticmethod
    def _raise(error: Optional[BaseException]) -> None:
        if error is not None:
            raise error

    def _on_leader(self, fn, *args):
        """``fn(*args)`` on the TP leader; its value -- or its error -- on every rank of the TP group (a
        failure on the leader must not leave the others waiting in a collective)."""
        error, status = None, None
        if self.leader:
            try:
                status = ("ok", fn(*args))
            except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
                error, status = e, ("error", isinstance(e, ValueError), f"{type(e).__name__}: {e}")
        status = broadcast_from_tp_leader(status)
        if error is not None:
            raise error
        if status[0] == "error":
            raise (ValueError if status[1] else RuntimeError)(f"on the tensor-parallel leader: {status[2]}")
        return status[1]

    # ---- the protocol

    def generate(self, requests: Sequence[GenerationRequest],
                 on_result: Optional[Callable[[GenerationResult], None]] = None) -> List[GenerationResult]:
        """Every rank of a TP group passes the same requests; the leader sends them (after a health check)
        and the results are broadcast. ``on_result``: on the leader as each result comes back, on the other
        ranks for every result after the broadcast."""
        assert not self.asleep, f"generate() while {sorted(self.asleep)} asleep: resume() first"
        requests = list(requests)
        results, dropped = self._on_leader(self._leader_generate, requests, on_result)
        if not self.leader and on_result is not None:
            for r in results:
                on_result(r)
        self.last_dropped = dropped
        self.dropped += dropped
        return results

    def _leader_generate(self, requests, on_result):
        self.client.wait_healthy(self.client.timeout_s, self.process)
        results = self.rollout.generate(requests, on_result)
        return results, self.rollout.last_dropped

    def score(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> List[List[float]]:
        """Raw-policy log-probs of ``outputs[i]`` after ``prompts[i]`` (teacher-forced ``prompt_logprobs``)."""
        assert not self.asleep, f"score() while {sorted(self.asleep)} asleep: resume() first"
        return self._on_leader(lambda: self.rollout.score(prompts, outputs))

    def _export(self, model) -> Tuple[int, Optional[BaseException]]:
        """The weights as safetensors in the weights directory (collective over the TP group; the leader
        writes): (bytes, the leader's write error or None). A leader that fails to write still runs the
        export to its end, so that the group's collectives stay in step."""
        tensors = megatron_to_hf_tensors(model, self.arch, self.dtype, untie=True)
        if not self.leader:
            return sum(t.numel() * t.element_size() for _, t in tensors), None
        try:
            return write_safetensors_buckets(tensors, self.dir, self.sync_bucket_bytes), None
        except Exception as e:  # noqa: BLE001 -- reported to the whole group by the caller
            for _ in tensors:
                pass
            return 0, e

    def update_weights(self, model) -> None:
        """Export the trainer's weights, reload them into the server, reset its prefix cache;
        ``weight_version += 1``. Timing: ``last_sync_s`` / ``last_sync_bytes`` / ``last_sync_gbps``."""
        assert WEIGHTS not in self.asleep, "update_weights() into sleeping weights: resume(['weights']) first"
        t0 = time.perf_counter()
        status = None
        if self.syncs:
            nbytes, error = self._export(model)
            if self.leader:
                try:
                    if error is not None:
                        raise error
                    self._reload()
                    status = ("ok", nbytes)
                except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
                    status = ("error", isinstance(e, ValueError), f"{type(e).__name__}: {e}")
        # the outcome, from the leader that synced: a shared server's is global rank 0
        status = _world_broadcast(status) if self.external else broadcast_from_tp_leader(status)
        if status[0] == "error":
            raise (ValueError if status[1] else RuntimeError)(f"weight sync failed: {status[2]}")
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = int(status[1])
        self.last_sync_gbps = self.last_sync_bytes / max(self.last_sync_s, 1e-9) / 1e9
        self.weight_version += 1
        if self.leader and self.syncs:
            log.info("vllm_server: weight version %d synced to %s: %.1f MB in %.3fs (%.2f GB/s)", self.weight_version,
                     self.url, self.last_sync_bytes / 1e6, self.last_sync_s, self.last_sync_gbps)

    def _reload(self) -> None:
        c = self.client
        c.reload_weights(self.dir)
        for a in range(c.retries + 1):
            if a:
                time.sleep(c.backoff(a))
            if c.reset_prefix_cache():
                return
        raise RuntimeError(f"{c.where()}: POST /reset_prefix_cache answered success=false {c.retries + 1} times "
                           "after the weight reload (requests still running?): its prefix cache would mix KV of "
                           "the old weights into new rollouts")

    def _note_no_sleep(self, what: str) -> None:
        if not self._noted_sleep and self.leader:
            why = "the server was given by URL" if self.external else "vLLM's sleep mode is CUDA-only"
            log.warning("vllm_server: %s keeps the server's memory (%s)", what, why)
        self._noted_sleep = True

    def release(self) -> None:
        """The server sleeps (``sleep_level``) where it can (see the module docstring)."""
        assert not self.asleep, f"release() while {sorted(self.asleep)} asleep"
        if self.sleeps:
            self._on_leader(lambda: self.client.sleep(self.sleep_level))
        else:
            self._note_no_sleep("release()")
        self.asleep = set(TAGS)

    def resume(self, tags: Optional[Sequence[str]] = None) -> None:
        """Wake ``tags`` (None: all); the loop wakes the weights, syncs them, then wakes the KV cache."""
        wake = check_tags(tags) & self.asleep
        if wake and self.sleeps:
            self._on_leader(lambda: self.client.wake_up(sorted(wake)))
        elif wake:
            self._note_no_sleep("resume()")
        self.asleep -= wake

    def close(self) -> None:
        """Stop a started server and remove the weights directory it owned (idempotent)."""
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None
        if self.process is not None:
            self.process.close()
            self.process = None
        if self._owns_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._owns_dir = False
