"""Reward registry, math-verify math reward, sandboxed code reward, exact reward."""

from __future__ import annotations

import threading
from typing import List, Sequence

import pytest

from megatron_kimi.rl.rewards import (
    REWARDS,
    RewardInput,
    RewardOutput,
    extract_code,
    extract_final_answer,
    get_reward,
    outputs_match,
    register_reward,
)

pytestmark = pytest.mark.timeout(180)


def _math(resp: str, ans: str | None) -> RewardInput:
    return RewardInput(prompt="q", response=resp, answer=ans, kind="math", tests=None, metadata={})


# ---------------------------------------------------------------------------------- registry
def plugin_reward(samples: Sequence[RewardInput]) -> List[RewardOutput]:
    """A user reward loaded by dotted path: 1 if the response is longer than the prompt."""
    return [RewardOutput(float(len(s.response) > len(s.prompt)), len(s.response) > len(s.prompt), {})
            for s in samples]


def plugin_scaled(samples, *, scale=1.0):
    return [RewardOutput(scale, True, {}) for _ in samples]


def test_builtin_registry():
    assert {"math", "code", "exact"} <= set(REWARDS)
    assert get_reward("exact") is REWARDS["exact"]


@pytest.mark.parametrize("spec", ["tests.rl.test_rewards:plugin_reward", "tests.rl.test_rewards.plugin_reward"])
def test_dotted_path_plugin(spec):
    fn = get_reward(spec)
    out = fn([RewardInput("ab", "abc", None, "x", None, {}), RewardInput("abcd", "a", None, "x", None, {})])
    assert [o.score for o in out] == [1.0, 0.0]


def test_kwargs_are_bound():
    assert get_reward("tests.rl.test_rewards:plugin_scaled", scale=0.25)([_math("", "")])[0].score == 0.25


def test_register_decorator():
    @register_reward("_test_const")
    def const(samples):
        return [RewardOutput(0.5, False, {}) for _ in samples]

    try:
        assert get_reward("_test_const")([_math("x", "y")])[0].score == 0.5
    finally:
        REWARDS.pop("_test_const")


@pytest.mark.parametrize("spec", ["nope", "tests.rl.test_rewards:missing", "no_such_pkg.mod:fn",
                                  "no_such_pkg.mod.fn"])
def test_unknown_reward_raises_value_error_naming_spec(spec):
    with pytest.raises(ValueError) as ei:
        get_reward(spec)
    assert spec in str(ei.value)


def test_non_callable_rejected():
    with pytest.raises(ValueError, match="non-callable"):
        get_reward("tests.rl.test_rewards:EQUIVALENT")


# ---------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("resp,want", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then corrected: \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("thinking...\nAnswer: 42\n", "42"),
    ("**Final answer:** $x^2$.", "x^2"),
    ("we get 3, then 1,234 apples", "1234"),
    ("no digits here", None),
])
def test_extract_final_answer(resp, want):
    assert extract_final_answer(resp) == want


# ---------------------------------------------------------------------------------- math
EQUIVALENT = [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{2x+1}", "1+2x"),
    ("Let me compute.\nanswer: 42", "42"),
    ("... so $x = 3$, i.e. \\boxed{3}", "3"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("It is 7, no wait, 12", "12"),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}"),
]
NOT_EQUIVALENT = [
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{2x+2}", "1+2x"),
    ("answer: 41", "42"),
    ("I don't know", "42"),
    ("", "1"),
    ("\\boxed{42}", None),
]


def test_math_reward_equivalent_and_not():
    fn = get_reward("math")
    samples = [_math(r, a) for r, a in EQUIVALENT + NOT_EQUIVALENT]
    out = fn(samples)
    assert len(out) == len(samples)
    got = [o.correct for o in out]
    assert got == [True] * len(EQUIVALENT) + [False] * len(NOT_EQUIVALENT), list(zip(samples, out))
    assert all(o.score == float(o.correct) for o in out)
    assert out[0].info["extracted"] == "\\frac{1}{2}"
    assert "error" in out[-1].info  # no reference answer


def test_math_reward_never_raises_on_garbage():
    garbage = ["\\boxed{\\frac{", "\\boxed{}}}}{{{", "$$$$", "\\boxed{\\int_0^\\infty}", "\x00\xff",
               "\\boxed{" + "(" * 500 + "}", "9" * 5000, "\\boxed{9^{9^{9^{9}}}}"]
    fn = get_reward("math", parse_timeout=1, verify_timeout=1)
    out = fn([_math(g, "1") for g in garbage] + [_math("\\boxed{1}", "\\frac{")])
    assert all(isinstance(o, RewardOutput) and o.score in (0.0, 1.0) for o in out)
    assert not any(o.correct for o in out)
    assert all(len(str(o.info)) < 2000 for o in out)


def test_math_reward_outer_timeout_replaces_the_pool():
    from megatron_kimi.rl import rewards

    get_reward("math")([_math("\\boxed{1}", "1")])  # warm pool
    slow = _math("\\boxed{9^{9^{9^{9}}}}", "1")  # math-verify needs ~verify_timeout s on this one
    out = get_reward("math", timeout_s=0.3, parse_timeout=3, verify_timeout=3)([slow])
    assert out[0].score == 0.0 and out[0].info["error"] == "timeout"
    assert rewards._MATH_POOL._pool is None  # discarded; the next call starts a fresh one
    assert get_reward("math")([_math("\\boxed{2}", "2")])[0].correct


def test_math_reward_from_a_thread_uses_the_pool():
    res = {}

    def run():
        res["out"] = get_reward("math")([_math("\\boxed{\\frac{1}{2}}", "0.5")])

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert res["out"][0].correct


def test_math_reward_in_process_main_thread():
    out = get_reward("math", in_process=True)([_math("answer: 42", "42"), _math("\\boxed{2x+1}", "1+2x"),
                                               _math("\\boxed{5}", "6")])
    assert [o.correct for o in out] == [True, True, False]


def test_math_reward_empty_batch():
    assert get_reward("math")([]) == []


# ---------------------------------------------------------------------------------- exact
def test_exact_reward():
    fn = get_reward("exact")
    cases = [("42", "42", True), ("  42\n", "42", True), ("43", "42", False), ("4 2", "42", False),
             ("a+b=\nanswer: 42", "42", True), ("work...\nAnswer:  42  ", "42", True),
             ("answer: 42\nmore", "42", False), ("", "42", False), ("42", None, False)]
    out = fn([RewardInput("", r, a, "exact", None, {}) for r, a, _ in cases])
    assert [o.correct for o in out] == [c for _, _, c in cases]
    assert [o.score for o in out] == [float(c) for _, _, c in cases]


# ---------------------------------------------------------------------------------- code
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
             {"input": "0 0", "output": "0\n\n"}]


def _code(resp: str, tests=SUM_TESTS) -> RewardInput:
    return RewardInput("add two numbers", resp, None, "code", tests, {})


GOOD = "Here you go:\n```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```\n"
WRONG = "```python\nprint(42)\n```"
CRASH = "```python\nraise SystemExit(1)\n```"
LOOP = "```python\nwhile True:\n    pass\n```"


def test_extract_code():
    assert extract_code(GOOD).startswith("import sys")
    two = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```text\nout\n```"
    assert extract_code(two) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"
    assert extract_code("```python\nprint(5)\n") == "print(5)\n"  # unterminated fence


def test_outputs_match():
    assert outputs_match("3\n", "3")
    assert outputs_match("a  \r\nb\n\n", "a\nb")
    assert not outputs_match("3 4", "3  4")
    assert not outputs_match("", "0")


PARTIAL = "```python\na, b = map(int, input().split())\nprint(a + b if b >= 0 else a - b)\n```"  # fails 10 -4


def test_code_reward_pass_partial_fail():
    partial_prog = PARTIAL
    samples = [_code(GOOD), _code(partial_prog), _code(WRONG), _code(CRASH), _code(LOOP),
               _code(GOOD, tests=[])]
    out = get_reward("code", all_or_nothing=False, timeout_s=2.0, cpu_s=1)(samples)
    assert [o.score for o in out[:5]] == [1.0, pytest.approx(2 / 3), 0.0, 0.0, 0.0]
    assert [o.correct for o in out] == [True, False, False, False, False, False]
    assert out[1].info["verdicts"] == ["pass", "wrong_answer", "pass"]
    assert out[3].info["verdicts"][0] == "exit:1"
    assert out[4].info["verdicts"][0] in ("cpu_limit", "wall_timeout")
    assert out[5].info["error"] == "no test cases"
    assert any(m.startswith("backend:") for m in out[0].info["mechanisms"])


def test_code_reward_all_or_nothing_default():
    out = get_reward("code")([_code(GOOD), _code(PARTIAL)])
    assert [o.score for o in out] == [1.0, 0.0]
    assert out[1].info["passed"] <= 2 and out[1].info["total"] == 3


def test_code_reward_parallel_many_samples():
    samples = [_code(GOOD if i % 2 == 0 else WRONG) for i in range(6)]
    out = get_reward("code", max_concurrency=3)(samples)
    assert [o.score for o in out] == [1.0, 0.0] * 3


def test_auto_reward_dispatches_on_kind():
    samples = [RewardInput("", "42", "42", "exact", None, {}), _math("\\boxed{\\frac{1}{2}}", "0.5"),
               _code(WRONG), RewardInput("", "43", "42", "exact", None, {})]
    out = get_reward("auto")(samples)
    assert [o.correct for o in out] == [True, True, False, False]
