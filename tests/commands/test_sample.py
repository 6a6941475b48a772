"""`megatron-kimi sample`: shortest rejection sampling -> an SFT jsonl and a samples file for DPO."""

from __future__ import annotations

import json
import math

import pytest

from megatron_kimi.commands.sample import select, shortest_correct, summary_line
from tests.commands.test_difficulty import COMMON as DIFFICULTY_COMMON, _cli

N = 4
COMMON = ["data.reward=tests.commands.sample_rewards:by_answer"] + DIFFICULTY_COMMON[1:]
ANSWERS = ["all", "none", "digit", "all", "none", "digit", "all"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A one-iteration RL checkpoint of the demo model, then `sample` on 7 prompts whose correctness the
    reward sets by their "answer" (all / none / digit)."""
    tmp = tmp_path_factory.mktemp("sample")
    _cli("rl", "examples/demo/rl.yaml", f"run_dir={tmp / 'rl'}", "rl.iterations=1", "rl.k=2",
         "rl.prompts_per_iteration=2", "data.eval_size=2", *DIFFICULTY_COMMON)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{2 * i}=", "answer": a}) + "\n"
                               for i, a in enumerate(ANSWERS)))
    out = _cli("sample", "examples/demo/rl.yaml", f"run_dir={tmp / 's'}",
               f"checkpoint.load={tmp / 'rl' / 'checkpoints'}", f"data.prompts={prompts}", f"sample.n={N}", "sample.batch_prompts=3", *COMMON)
    rows = [json.loads(x) for x in (tmp / "s" / "samples.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp / "s" / "shortest.jsonl").read_text().splitlines()]
    return tmp, out, rows, sft


def test_keeps_the_shortest_correct_and_leaves_out_prompts_without_one(sampled):
    tmp, out, rows, sft = sampled
    assert [r["prompt"] for r in rows] == [f"{i}+{2 * i}=" for i in range(len(ANSWERS))]
    expected = []
    for r, a in zip(rows, ANSWERS):
        assert r["answer"] == a and len(r["samples"]) == N
        for s in r["samples"]:
            assert s["correct"] == (a == "all" or (a == "digit" and s["response"][:1].isdigit()))
            assert 1 <= s["tokens"] <= 3  # rollout.max_new_tokens=3
        correct = [s for s in r["samples"] if s["correct"]]
        if correct:
            shortest = min(s["tokens"] for s in correct)
            best = next(s for s in correct if s["tokens"] == shortest)  # the first of the shortest
            expected.append({"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": best["response"]}]})
    assert sft == expected
    assert len(sft) <= len(ANSWERS) - ANSWERS.count("none")
    accepted = len(sft)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"sample: acceptance rate {accepted / len(ANSWERS):.3f} ({accepted}/{len(ANSWERS)} prompts")
    all_tokens = [s["tokens"] for r in rows for s in r["samples"]]
    assert f"all {sum(all_tokens) / len(all_tokens):.2f} ({len(all_tokens)} samples)" in last
    assert not list((tmp / "s").glob("*.tmp"))


def test_sft_loader_reads_the_output_and_dpo_pairs_from_samples(sampled):
    from megatron_kimi.data.sft_cache import build_or_load_cache
    from megatron_kimi.data.tokenizer import load_tokenizer
    from megatron_kimi.dpo.data import tokenize_pairs

    tmp, _, rows, sft = sampled
    cache = build_or_load_cache(tmp / "s" / "shortest.jsonl", "builtin:char", tmp / "cache", num_workers=1)
    assert len(cache) == len(sft) > 0
    ids, mask = cache.sample(0)
    assert mask.sum() > 0 and mask.sum() < len(ids)  # the assistant turn is in the loss, the prompt is not

    pairs = tokenize_pairs(tmp / "s" / "samples.jsonl", load_tokenizer("builtin:char", tmp / "cache"), "samples",
                           length_ratio=1.5)
    n_pairs = no_correct = no_negative = 0
    for r in rows:  # long2short by hand: vs every wrong sample and every correct one > 1.5x the shortest
        correct = [s["tokens"] for s in r["samples"] if s["correct"]]
        if not correct:
            no_correct += 1
            continue
        negs = sum(not s["correct"] or s["tokens"] > 1.5 * min(correct) for s in r["samples"])
        no_negative += negs == 0
        n_pairs += negs
    assert pairs.stats["records"] == len(rows)
    assert (pairs.stats["pairs"], pairs.stats["no_correct"], pairs.stats["no_negative"]) == \
        (n_pairs, no_correct, no_negative)
    assert no_correct >= ANSWERS.count("none")


def test_select_shortest_correct_first_on_tie_and_the_summary(tmp_path):
    s = lambda r, c, t: {"response": r, "correct": c, "tokens": t}  # noqa: E731
    rows = [{"prompt": "p0", "samples": [s("long", True, 9), s("x", False, 1), s("a", True, 3), s("b", True, 3)]},
            {"prompt": "p1", "samples": [s("w", False, 2), s("v", False, 5)]},
            {"prompt": "p2", "samples": [s("only", True, 4)]}]
    assert [shortest_correct(r["samples"]) for r in rows] == [2, None, 0]
    sft, stats = select(rows)
    assert [m["messages"][1]["content"] for m in sft] == ["a", "only"]
    assert sft[0]["messages"][0] == {"role": "user", "content": "p0"}
    assert stats["acceptance_rate"] == pytest.approx(2 / 3) and stats["rejected"] == 1
    assert stats["mean_tokens_all"] == pytest.approx(27 / 7)
    assert stats["mean_tokens_correct"] == pytest.approx(19 / 4)
    assert stats["mean_tokens_kept"] == pytest.approx(3.5)
    line = summary_line(stats, tmp_path / "a", tmp_path / "b")
    assert "acceptance rate 0.667 (2/3 prompts" in line and "kept 3.50 (2)" in line
    assert math.isnan(select([])[1]["acceptance_rate"])


def test_output_equal_to_input_is_an_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "all"}) + "\n")
    before = prompts.read_bytes()
    out = _cli("sample", "examples/demo/rl.yaml", f"run_dir={tmp_path / 'r'}", f"data.prompts={prompts}",
               f"sample.samples_output={prompts}", *COMMON, check=False)
    assert out.returncode == 2 and "is data.prompts" in out.stderr, out.stderr[-2000:]
    assert prompts.read_bytes() == before
