"""A fake of vLLM 0.32's OpenAI-compatible server: the endpoints :mod:`megatron_kimi.rollout.server_backend`
uses, answering in vLLM's JSON shapes, with fault injection. No vLLM needed.

Shapes copied from vLLM 0.32: ``CompletionResponse`` / ``CompletionResponseChoice`` / ``CompletionLogProbs`` /
``UsageInfo`` (vllm/entrypoints/openai/completion/protocol.py, serving.py: ``token_logprobs`` of the
sampled tokens, ``tokens`` as ``"token_id:N"`` with ``return_tokens_as_token_ids``, ``prompt_logprobs`` as
``[null, {"N": {"logprob", "rank", "decoded_token"}}, ...]``), ``ModelList`` / ``ModelCard`` / ``ErrorResponse``
(vllm/entrypoints/serve/engine/protocol.py), the dev endpoints (vllm/entrypoints/serve/dev/{cache,rpc,sleep}/
api_router.py: ``{"success": bool}``, ``{"results": [...]}``, ``{"is_sleeping": bool}``), ``/health`` (200, empty),
and FastAPI's 404 ``{"detail": "Not Found"}`` for an endpoint that is not there (dev mode off).

The fake "model": a deterministic next token of the sequence so far (and the seed), and log-probs that
are functions of (position, token) -- :func:`raw_logprob` for the raw policy, :func:`processed_logprob`
(= raw + 0.5) for truncated sampling -- so a test can tell which one the backend put where.

``python -m tests.rollout.fake_vllm_server --port P`` serves it in the foreground (a server process to
start and stop).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional

VOCAB = 128


def raw_logprob(position: int, token: int) -> float:
    """The fake raw policy's log pi of ``token`` at sequence ``position``."""
    return -(0.05 + 0.01 * (position % 37) + 0.001 * token)


def processed_logprob(position: int, token: int) -> float:
    """The fake truncated (temperature / top-k / top-p) distribution's log-prob."""
    return raw_logprob(position, token) + 0.5


def next_token(seq: List[int], seed: Optional[int], vocab: int = VOCAB) -> int:
    return (sum(seq) * 31 + len(seq) * 17 + (seed or 0) * 7) % vocab


def is_truncated(body: dict) -> bool:
    t = body.get("temperature", 1.0)
    return t != 0.0 and not (t == 1.0 and (body.get("top_k") or 0) <= 0 and body.get("top_p", 1.0) >= 1.0)


def expected(prompt: List[int], max_tokens: int, seed: Optional[int], stop_ids=(), vocab: int = VOCAB) -> tuple:
    """(tokens, finish reason) the fake generates."""
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        t = next_token(seq, seed, vocab)
        out.append(t)
        seq.append(t)
        if t in stop_ids:
            return out, "stop"
    return out, "length"


class FakeVllmServer:
    """The fake on 127.0.0.1 (a free port) in a daemon thread; ``url``, ``calls`` (method, path, body),
    ``completions`` (bodies of /v1/completions, in arrival order).

    Fault injection: ``fault(body, n)`` for a /v1/completions request (``n``: earlier requests with the same
    prompt) returns None (answer), an HTTP status to fail with, or ``"hang"`` (answer nothing for
    ``hang_s`` or until :meth:`stop`). ``healthy=False``: /health answers 503. ``reset_ok=False``:
    /reset_prefix_cache answers ``{"success": false}``. ``dev_mode=False``: no dev endpoints (404).
    ``vocab``: generated tokens are below it.
    """

    def __init__(self, *, dev_mode: bool = True, reset_ok: bool = True, max_model_len: int = 1024,
                 model: str = "/dev/shm/fake-model", port: int = 0, vocab: int = VOCAB):
        self.dev_mode, self.reset_ok, self.max_model_len, self.model = dev_mode, reset_ok, max_model_len, model
        self.vocab = vocab
        self.healthy = True
        self.fault: Optional[Callable[[dict, int], object]] = None
        self.hang_s = 60.0
        self.calls: List[tuple] = []
        self.completions: List[dict] = []
        self.reload_files: List[List[str]] = []  # the weights directory's files at each reload_weights
        self._seen: Dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "FakeVllmServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # hung handlers return
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def paths(self) -> List[str]:
        return [p for _, p, _ in self.calls]

    # ---- the endpoints: (status, JSON document or None for an empty body)

    def handle(self, method: str, path: str, body) -> tuple:
        url = urllib.parse.urlparse(path)
        with self._lock:
            self.calls.append((method, path, body))
        route = (method, url.path)
        if route == ("GET", "/health"):
            return (200, None) if self.healthy else (503, None)
        if route == ("GET", "/v1/models"):
            return 200, {"object": "list", "data": [{
                "id": self.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": self.model, "parent": None, "max_model_len": self.max_model_len,
                "permission": [{"id": "modelperm-0", "object": "model_permission", "created": int(time.time()),
                                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                                "organization": "*", "group": None, "is_blocking": False}]}]}
        if route == ("POST", "/v1/completions"):
            return self.complete(body)
        dev = {("GET", "/is_sleeping"), ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"),
               ("POST", "/sleep"), ("POST", "/wake_up")}
        if route not in dev or not self.dev_mode:
            return 404, {"detail": "Not Found"}
        query = urllib.parse.parse_qs(url.query)
        if route == ("GET", "/is_sleeping"):
            return 200, {"is_sleeping": False}
        if route == ("POST", "/collective_rpc"):
            if body.get("method") == "reload_weights":
                d = body.get("kwargs", {}).get("weights_path", "")
                self.reload_files.append(sorted(os.listdir(d)) if os.path.isdir(d) else [])
            return 200, {"results": [None]}
        if route == ("POST", "/reset_prefix_cache"):
            return 200, {"success": bool(self.reset_ok)}
        if route == ("POST", "/sleep"):
            return 200, {"status": "sleeping", "level": int(query.get("level", ["1"])[0])}
        tags = query.get("tags") or None
        return 200, {"status": "awake", "tags": tags}

    def complete(self, body: dict) -> tuple:
        prompt = [int(t) for t in body["prompt"]]
        with self._lock:
            self.completions.append(body)
            key = tuple(prompt)
            n = self._seen.get(key, 0)
            self._seen[key] = n + 1
        what = self.fault(body, n) if self.fault is not None else None
        if what == "hang":
            self._stop.wait(self.hang_s)
            return 500, _error("hung", 500)
        if isinstance(what, int):
            return what, _error(f"injected failure {what}", what)
        max_tokens = int(body.get("max_tokens", 16))
        if len(prompt) + max_tokens > self.max_model_len:
            return 400, _error(f"This model's maximum context length is {self.max_model_len} tokens", 400)
        greedy = body.get("temperature", 1.0) == 0.0
        seed = None if greedy else body.get("seed")
        stop_ids = set(body.get("stop_token_ids") or [])
        tokens, finish = expected(prompt, max_tokens, seed, () if body.get("prompt_logprobs") is not None
                                  else stop_ids, self.vocab)
        lp = processed_logprob if is_truncated(body) else raw_logprob
        lps = [lp(len(prompt) + j, t) for j, t in enumerate(tokens)]
        logprobs = None
        if body.get("logprobs") is not None:
            names = [f"token_id:{t}" for t in tokens]
            offsets, at = [], 0
            for name in names:
                offsets.append(at)
                at += len(name)
            logprobs = {"text_offset": offsets, "token_logprobs": lps, "tokens": names,
                        "top_logprobs": [{nm: v} for nm, v in zip(names, lps)]}
        prompt_logprobs = None
        if body.get("prompt_logprobs") is not None:
            prompt_logprobs = [None] + [{str(t): {"logprob": raw_logprob(i, t), "rank": 1, "decoded_token": None}}
                                        for i, t in enumerate(prompt) if i > 0]
        ret_ids = bool(body.get("return_token_ids"))
        return 200, {
            "id": f"cmpl-{len(self.completions)}", "object": "text_completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "text": "", "logprobs": logprobs, "finish_reason": finish,
                         "stop_reason": tokens[-1] if finish == "stop" else None,
                         "token_ids": tokens if ret_ids else None, "prompt_logprobs": prompt_logprobs,
                         "prompt_token_ids": prompt if ret_ids else None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + len(tokens),
                      "completion_tokens": len(tokens), "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _error(message: str, code: int) -> dict:
    return {"error": {"message": message, "type": "BadRequestError" if code < 500 else "InternalServerError",
                      "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _serve(self, method: str) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        body = json.loads(raw) if raw else None
        status, doc = self.server.fake.handle(method, self.path, body)  # type: ignore[attr-defined]
        data = b"" if doc is None else json.dumps(doc).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-model-len", type=int, default=1024)
    a = ap.parse_args()
    fake = FakeVllmServer(port=a.port, max_model_len=a.max_model_len)
    print(f"fake vLLM server at {fake.url}", flush=True)
    fake.httpd.serve_forever(poll_interval=0.05)
