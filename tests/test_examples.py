"""Every example config loads and validates under the schema of the command its header names."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_kimi.cli import COMMANDS
from megatron_kimi.config import load_config

REPO = Path(__file__).resolve().parents[1]
# The command each example is for (a new example must be added here: the test fails on an unlisted one).
EXAMPLES = {
    "bench/llama_1b.yaml": "train",
    "demo/rl.yaml": "rl",
    "demo/rl_vllm.yaml": "rl",
    "demo/sft_warmup.yaml": "sft",
    "demo/sft_warmup_rope.yaml": "sft",
    "long2short/dpo.yaml": "dpo",
    "long2short/rl.yaml": "rl",
    "long_context/qwen2_32b_128k.yaml": "sft",
    "long_context/qwen2_7b_128k.yaml": "sft",
    "recipe/dpo.yaml": "dpo",
    "recipe/long2short_rl.yaml": "rl",
    "recipe/rl.yaml": "rl",
    "recipe/shortest_sft.yaml": "sft",
    "recipe/sft_warmup.yaml": "sft",
    "vision/rl_tiny.yaml": "rl",
    "vision/sft_tiny.yaml": "sft",
    "sft/kimi_two_stage_7b.yaml": "sft",
    "sft/long_cot_warmup_tiny.yaml": "sft",
    "tiny/sft.yaml": "sft",
    "tiny/train.yaml": "train",
}


def test_every_example_is_listed():
    found = {str(p.relative_to(REPO / "examples")) for p in (REPO / "examples").rglob("*.yaml")}
    assert found == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_loads(name):
    schema = COMMANDS[EXAMPLES[name]][0]
    load_config(str(REPO / "examples" / name), [], schema)
