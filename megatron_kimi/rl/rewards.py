"""Reward functions for Kimi k1.5 RL (paper §2.3.3 verifiable rewards, §2.4 code sandbox).

A reward function is **pure and batched**: ``fn(samples: Sequence[RewardInput]) -> list[RewardOutput]``
(one output per input, same order), so that slow verifiers (sandboxes) can run in parallel.
Optional keyword-only arguments configure it; ``get_reward("code", all_or_nothing=False)`` binds them.

Registered:

``"math"``   final answer vs the dataset answer with ``math-verify`` (``parse`` + ``verify``): 1/0.
            The response's final answer is the last ``\\boxed{...}``, else the last
            ``answer: X`` line, else the last number (:func:`extract_final_answer`).  math-verify
            uses ``signal.alarm`` (main thread only), so scoring runs in a small, lazily created,
            reused process pool (forkserver; entry scripts need an ``if __name__ == "__main__":``
            guard, as for any multiprocessing) with a per-item timeout, or in-process when
            ``in_process=True`` (main thread only).  A parser error never raises: score 0 and
            ``info["error"]``.
``"code"``   the response's program (the last ```` ```python ```` fenced block, else the last
            fenced block, else the whole response) runs in :mod:`megatron_kimi.rl.sandbox` once per
            test case ``{"input": stdin, "output": expected stdout}``; outputs are compared line by
            line ignoring trailing whitespace and trailing blank lines.  Score = 1 only if all pass
            (``all_or_nothing=True``, the paper's choice) else the fraction passed; at most
            ``max_concurrency`` (default 2) sandbox runs at once over all samples and cases.
            ``info["limits"]`` counts the runs in which each sandbox limit tripped (``memory``,
            ``pids``, ``timeout``, ``network``, ``fs``, ...: ``SandboxResult.limits``).
``"exact"``  ``response.strip() == answer.strip()``, or the last line reads ``answer: X`` with
            ``X == answer`` (the embedded arithmetic demo): 1/0.
``"auto"``   dispatches each sample on its ``kind`` to the reward of that name.

User rewards: ``@register_reward("name")``, or any ``"package.module:function"`` /
``"package.module.function"`` given to :func:`get_reward`.

The RL loop calls every reward through :func:`call_reward`: a reward that raises, returns garbage or
hangs past ``rl.reward_timeout_s`` scores 0 for the samples concerned, and the loop counts them
(``reward_errors``, ``reward_timeouts`` in the RL metrics) instead of stopping.
"""

from __future__ import annotations

import functools
import importlib
import math
import multiprocessing
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

__all__ = [
    "RewardInput",
    "RewardOutput",
    "RewardFn",
    "REWARDS",
    "register_reward",
    "get_reward",
    "extract_final_answer",
    "extract_code",
    "math_reward",
    "code_reward",
    "exact_reward",
    "auto_reward",
    "shutdown_math_pool",
    "call_reward",
]


@dataclass
class RewardInput:
    prompt: str
    response: str
    answer: Optional[str] = None
    kind: str = "math"
    tests: Optional[List[dict]] = None
    metadata: Dict = field(default_factory=dict)


@dataclass
class RewardOutput:
    score: float
    correct: bool
    info: Dict = field(default_factory=dict)


RewardFn = Callable[[Sequence[RewardInput]], List[RewardOutput]]
REWARDS: Dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@register_reward("name")`` makes ``get_reward("name")`` return the function."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


def _load_dotted(spec: str) -> object:
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        candidates = [(mod_name, attr)]
    else:
        parts = spec.split(".")
        # "a.b.c.fn" → try module a.b.c + fn, then a.b + c.fn, ...
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    errors = []
    for mod_name, attr in candidates:
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as e:
            errors.append(f"import {mod_name!r}: {e}")
            continue
        try:
            for a in attr.split("."):
                obj = getattr(obj, a)
        except AttributeError as e:
            errors.append(f"{mod_name!r} has no {attr!r}: {e}")
            continue
        return obj
    raise ValueError(f"reward {spec!r} not found ({'; '.join(errors) or 'not a dotted path'}); "
                     f"registered rewards: {sorted(REWARDS)}")


def get_reward(name_or_path: str, **kwargs) -> RewardFn:
    """The reward registered as ``name_or_path``, or the function at a dotted path
    (``"package.module:function"`` or ``"package.module.function"``).  Keyword arguments are
    bound to it (``functools.partial``)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"reward spec must be a non-empty string, got {name_or_path!r}")
    if name_or_path in REWARDS:
        fn: object = REWARDS[name_or_path]
    elif "." in name_or_path or ":" in name_or_path:
        fn = _load_dotted(name_or_path)
    else:
        raise ValueError(f"unknown reward {name_or_path!r}; registered rewards: {sorted(REWARDS)} "
                         "(or give 'package.module:function')")
    if not callable(fn):
        raise ValueError(f"reward {name_or_path!r} resolves to a non-callable {type(fn).__name__}")
    return functools.partial(fn, **kwargs) if kwargs else fn  # type: ignore[return-value]


# =============================================================================================
# answer extraction
# =============================================================================================
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"^[\s>*#_-]*(?:final\s+)?answer\s*(?:is)?\s*[:：=]\s*(.+?)\s*$", re.I | re.M)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def _last_boxed(text: str) -> Optional[str]:
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1]
    return last


def extract_final_answer(response: str) -> Optional[str]:
    """The response's final answer: last ``\\boxed{...}``, else last ``answer: X`` line, else last
    number; ``None`` when there is none.  Returned without ``\\boxed``/``$`` wrapping."""
    if not response:
        return None
    boxed = _last_boxed(response)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    lines = _ANSWER_LINE.findall(response)
    if lines:
        ans = lines[-1].strip().strip("*_`").strip()
        ans = re.sub(r"[.。]\s*$", "", ans).strip()
        if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
            ans = ans.strip("$").strip()
        if ans:
            return ans
    nums = _NUMBER.findall(response)
    if nums:
        return nums[-1].replace(",", "").replace(" ", "")
    return None


def _as_latex(s: str) -> str:
    s = s.strip()
    if "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s:
        return s
    return f"${s}$"


# =============================================================================================
# math: math-verify, in a worker process pool
# =============================================================================================
def _math_score_one(response: str, answer: Optional[str], parse_timeout: int,
                    verify_timeout: int) -> tuple:
    """(correct, info); never raises.  Runs in a pool worker (or the main thread)."""
    info: Dict = {}
    try:
        if answer is None or not str(answer).strip():
            return False, {"error": "no reference answer"}
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
        pred_str = extract_final_answer(response)
        info["extracted"] = pred_str if pred_str is None else pred_str[:200]
        if pred_str is None:
            return False, info
        gold = parse(_as_latex(str(answer)), extraction_config=cfg, parsing_timeout=parse_timeout)
        pred = parse(_as_latex(pred_str), extraction_config=cfg, parsing_timeout=parse_timeout)
        info["gold"] = [str(g)[:200] for g in gold[:2]]
        info["pred"] = [str(p)[:200] for p in pred[:2]]
        if not gold:
            # unparseable reference: fall back to a whitespace-insensitive string match
            ok = re.sub(r"\s+", "", str(answer)) == re.sub(r"\s+", "", pred_str)
            info["error"] = "reference answer not parseable by math-verify"
            return ok, info
        if not pred:
            return False, info
        return bool(verify(gold, pred, timeout_seconds=verify_timeout)), info
    except BaseException as e:  # noqa: BLE001 - a reward must never crash the trainer
        info["error"] = f"{type(e).__name__}: {e}"[:500]
        return False, info


def _math_worker_init() -> None:
    try:
        import math_verify  # noqa: F401  (warm import: sympy/antlr take ~1 s)
    except Exception:
        pass


class _MathPool:
    """A lazily created, reused ``multiprocessing.Pool`` (forkserver on Linux, else spawn)."""

    def __init__(self) -> None:
        self._pool = None
        self._n = 0
        self._lock = threading.Lock()

    def get(self, workers: int):
        """(pool, fresh): ``fresh`` when it was just created (its workers still import math-verify)."""
        with self._lock:
            fresh = self._pool is None or self._n != workers
            if fresh:
                self._close_locked()
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
                ctx = multiprocessing.get_context(method)
                self._pool = ctx.Pool(processes=workers, initializer=_math_worker_init,
                                      maxtasksperchild=2000)
                self._n = workers
            return self._pool, fresh

    def discard(self) -> None:
        """Terminate the pool (after a timeout a worker may be wedged); the next call makes a new one."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._pool is not None:
            try:
                self._pool.terminate()
                self._pool.join()
            except Exception:
                pass
            self._pool = None


_MATH_POOL = _MathPool()


def shutdown_math_pool() -> None:
    """Stop the math worker processes (they are also stopped at interpreter exit)."""
    _MATH_POOL.discard()


@register_reward("math")
def math_reward(samples: Sequence[RewardInput], *, workers: int = 2, timeout_s: float = 15.0,
                parse_timeout: int = 3, verify_timeout: int = 3,
                in_process: Optional[bool] = None) -> List[RewardOutput]:
    """1/0 by math-verify equivalence of the final answer to ``answer`` (see the module doc).

    ``timeout_s`` bounds each item (beyond math-verify's own ``parse_timeout``/``verify_timeout``);
    items still unscored at the batch deadline (``timeout_s`` × ceil(n / workers), + 30 s when the
    pool was just started)
    score 0 with ``info["error"] = "timeout"`` and the pool is replaced.  ``in_process=True`` scores
    in the calling thread (must be the main thread); ``None`` = the pool.
    """
    n = len(samples)
    if n == 0:
        return []
    results: List[Optional[tuple]] = [None] * n
    if in_process:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("math_reward(in_process=True) must run in the main thread (signal.alarm)")
        for i, s in enumerate(samples):
            results[i] = _math_score_one(s.response, s.answer, parse_timeout, verify_timeout)
    else:
        pool, fresh = _MATH_POOL.get(max(1, workers))
        pending = [pool.apply_async(_math_score_one, (s.response, s.answer, parse_timeout, verify_timeout))
                   for s in samples]
        deadline = (time.monotonic() + timeout_s * math.ceil(n / max(1, workers))
                    + (30.0 if fresh else 0.0))
        timed_out = False
        for i, ar in enumerate(pending):
            try:
                results[i] = ar.get(timeout=max(0.0, deadline - time.monotonic()))
            except multiprocessing.TimeoutError:
                timed_out = True
                results[i] = (False, {"error": "timeout"})
            except Exception as e:  # noqa: BLE001 (pickling errors, a dead worker, ...)
                results[i] = (False, {"error": f"{type(e).__name__}: {e}"[:500]})
        if timed_out:
            _MATH_POOL.discard()
    return [RewardOutput(score=1.0 if ok else 0.0, correct=bool(ok), info=info) for ok, info in results]


# =============================================================================================
# code: run in the sandbox against the test cases
# =============================================================================================
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(response: str) -> str:
    """The last ```` ```python ```` (or ``py``/``python3``) fenced block, else the last fenced block
    of any language, else the whole response."""
    blocks = _FENCE.findall(response or "")
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return response or ""


def _normalize_output(s: str) -> List[str]:
    lines = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(actual: str, expected: str) -> bool:
    """Line-by-line equality ignoring trailing whitespace, CRLF and trailing blank lines."""
    return _normalize_output(actual) == _normalize_output(expected)


@register_reward("code")
def code_reward(samples: Sequence[RewardInput], *, all_or_nothing: bool = True,
                max_concurrency: int = 2, timeout_s: float = 5.0, cpu_s: int = 5,
                memory_mb: int = 512, max_procs: int = 64, backend: str = "auto") -> List[RewardOutput]:
    """Fraction of test cases passed (or 1/0 with ``all_or_nothing``) by the response's program.

    Per-sample overrides in ``metadata``: ``time_limit_s``, ``memory_mb``.  With
    ``all_or_nothing`` the remaining cases of a sample are skipped after its first failure.
    """
    from megatron_kimi.rl.sandbox import run_sandboxed

    n = len(samples)
    if n == 0:
        return []
    codes = [extract_code(s.response) for s in samples]
    tests = [list(s.tests or []) for s in samples]
    verdicts: List[List[Optional[str]]] = [[None] * len(t) for t in tests]
    failed = [False] * n
    mechanisms: List[Optional[list]] = [None] * n
    limits: List[Dict[str, int]] = [{} for _ in range(n)]  # sandbox limit -> runs in which it tripped
    lock = threading.Lock()

    def job(i: int, j: int) -> None:
        if all_or_nothing and failed[i]:
            verdicts[i][j] = "skipped"
            return
        case = tests[i][j]
        md = samples[i].metadata or {}
        try:
            r = run_sandboxed(codes[i], str(case.get("input", "")),
                              timeout_s=float(md.get("time_limit_s", timeout_s)),
                              cpu_s=int(math.ceil(float(md.get("time_limit_s", cpu_s)))),
                              memory_mb=int(md.get("memory_mb", memory_mb)), max_procs=max_procs,
                              backend=backend)
        except Exception as e:  # noqa: BLE001 - sandbox trouble scores 0, never crashes
            v = f"sandbox_error: {type(e).__name__}: {e}"[:300]
        else:
            expected = case.get("output", case.get("expected_output", ""))
            if r.error:
                v = f"sandbox_error: {r.error}"[:300]
            elif r.timed_out or r.killed_reason:
                v = r.killed_reason or "timeout"
            elif r.exit_code != 0:
                v = f"exit:{r.exit_code}"
            elif outputs_match(r.stdout, str(expected)):
                v = "pass"
            else:
                v = "wrong_answer"
            with lock:
                if mechanisms[i] is None:
                    mechanisms[i] = r.mechanisms
                for k in r.limits:
                    limits[i][k] = limits[i].get(k, 0) + 1
        verdicts[i][j] = v
        if v != "pass":
            failed[i] = True

    work = [(i, j) for i in range(n) for j in range(len(tests[i]))]
    if work:
        with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(work))),
                                thread_name_prefix="code-reward") as ex:
            for f in [ex.submit(job, i, j) for i, j in work]:
                f.result()
    outs = []
    for i in range(n):
        total = len(tests[i])
        passed = sum(v == "pass" for v in verdicts[i])
        info = {"passed": passed, "total": total, "verdicts": verdicts[i], "mechanisms": mechanisms[i],
                "limits": limits[i]}
        if total == 0:
            info["error"] = "no test cases"
            outs.append(RewardOutput(0.0, False, info))
            continue
        all_pass = passed == total
        score = (1.0 if all_pass else 0.0) if all_or_nothing else passed / total
        outs.append(RewardOutput(score, all_pass, info))
    return outs


# =============================================================================================
# exact match (the embedded arithmetic demo)
# =============================================================================================
_LAST_ANSWER = re.compile(r"^\s*answer\s*:\s*(.*?)\s*$", re.I)


@register_reward("exact")
def exact_reward(samples: Sequence[RewardInput]) -> List[RewardOutput]:
    """1 if ``response.strip() == answer.strip()`` or the last line is ``answer: <answer>``."""
    outs = []
    for s in samples:
        if s.answer is None:
            outs.append(RewardOutput(0.0, False, {"error": "no reference answer"}))
            continue
        resp, ans = (s.response or "").strip(), str(s.answer).strip()
        ok = resp == ans
        if not ok and resp:
            m = _LAST_ANSWER.match(resp.rsplit("\n", 1)[-1])
            ok = m is not None and m.group(1) == ans
        outs.append(RewardOutput(1.0 if ok else 0.0, ok, {}))
    return outs


@register_reward("auto")
def auto_reward(samples: Sequence[RewardInput]) -> List[RewardOutput]:
    """Scores each sample with the reward named by its ``kind`` (one batched call per kind)."""
    out: List[Optional[RewardOutput]] = [None] * len(samples)
    by_kind: Dict[str, List[int]] = {}
    for i, s in enumerate(samples):
        by_kind.setdefault(s.kind, []).append(i)
    for kind, idx in by_kind.items():
        if kind == "auto":
            raise ValueError("RewardInput.kind 'auto' would recurse; name a concrete reward")
        res = get_reward(kind)([samples[i] for i in idx])
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


# =============================================================================================
# calling a reward safely: a reward that raises or hangs costs its samples, never the run
# =============================================================================================
def _run_limited(fn: Callable, args: tuple, timeout_s: float, name: str) -> tuple:
    """("ok", value) | ("error", message) | ("timeout", None); ``fn`` runs in a daemon thread."""
    box: Dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = f"{type(e).__name__}: {e}"[:500]

    t = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    t.start()
    t.join(max(0.0, timeout_s))
    if t.is_alive():
        return "timeout", None
    if "error" in box:
        return "error", box["error"]
    return "ok", box.get("value")


def _check_output(o: object) -> Optional[str]:
    """Why ``o`` is not a usable RewardOutput (None when it is)."""
    score = getattr(o, "score", None)
    try:
        ok = score is not None and math.isfinite(float(score))
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"invalid reward output {o!r:.200}: needs a finite float 'score'"


def _normalize(o: object) -> RewardOutput:
    if isinstance(o, RewardOutput):
        return o
    return RewardOutput(float(o.score), bool(getattr(o, "correct", False)), dict(getattr(o, "info", None) or {}))


def call_reward(fn: RewardFn, samples: Sequence[RewardInput], timeout_s: float,
                name: str = "reward") -> tuple:
    """Score ``samples`` with ``fn`` within ``timeout_s`` seconds; never raises.

    Returns ``(outputs, errors, timeouts)``. Past the limit every sample scores 0 with
    ``info["error"] = "timeout"`` (counted in ``timeouts``); the call's thread is left behind, as a
    Python thread cannot be stopped, so a reward that can hang should also bound itself (math and code
    do). When the call raises or returns a malformed result, each sample is scored alone, all within
    another ``timeout_s``, so that one bad sample costs only itself; a sample that still fails scores 0
    with ``info["error"]`` (counted in ``errors``), one not reached in time counts as a timeout.
    """
    n = len(samples)
    if n == 0:
        return [], 0, 0
    status, value = _run_limited(fn, (list(samples),), timeout_s, name)
    if status == "timeout":
        return [RewardOutput(0.0, False, {"error": "timeout"}) for _ in samples], 0, n
    if status == "ok" and isinstance(value, (list, tuple)) and len(value) == n:
        outs, errors = [], 0
        for o in value:
            why = _check_output(o)
            errors += why is not None
            outs.append(RewardOutput(0.0, False, {"error": why}) if why else _normalize(o))
        return outs, errors, 0
    first = value if status == "error" else f"returned {type(value).__name__} for {n} samples, not a list of {n}"
    outs, errors, timeouts = [], 0, 0
    deadline = time.monotonic() + timeout_s
    for s in samples:
        left = deadline - time.monotonic()
        status, value = _run_limited(fn, ([s],), left, name) if left > 0 else ("timeout", None)
        why = (value if status == "error" else "timeout" if status == "timeout"
               else _check_output(value[0]) if isinstance(value, (list, tuple)) and len(value) == 1
               else f"returned {type(value).__name__} for 1 sample")
        if why is None:
            outs.append(_normalize(value[0]))
            continue
        timeouts += why == "timeout"
        errors += why != "timeout"
        outs.append(RewardOutput(0.0, False, {"error": why, "batch_error": first}))
    return outs, errors, timeouts
