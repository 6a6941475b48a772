"""`megatron-kimi sft` with a VLM (model.vision): image chat data, packing with images, loss falls.

The data side (data/image_sft.py) is checked in-process: placeholder runs sized by each image's grid,
packs carrying their samples' images in order with a per-token feature index, an over-long image sample
dropped (never cut), and bad input naming the file and line. The command runs once on the synthetic
counting task in a subprocess (examples/vision/sft_tiny.yaml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.dist import run_cli
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_kimi.data.tokenizer import load_tokenizer

    return load_tokenizer("builtin:char", tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def image_jsonl(tmp_path_factory):
    from megatron_kimi.data.image_sft import builtin_image_jsonl

    return builtin_image_jsonl(tmp_path_factory.mktemp("img") / "data.jsonl", 12, seed=3)


def test_samples_and_packs_carry_their_images(tokenizer, image_jsonl):
    from megatron_kimi.data.image_sft import ImageSFTSet, PackedImageSFTSource
    from megatron_kimi.data.images import ImageProcessing

    data = ImageSFTSet(image_jsonl, tokenizer, "<|image|>", ImageProcessing())
    assert len(data) == 12 and data.stats["images"] == 12
    tid = data.image_token_id
    for i in range(len(data)):
        ids, mask = data.sample(i)
        pix, grid = data.images([i])
        n = int(grid.prod(-1).sum()) // 4
        run = ids == tid
        assert run.sum() == n and pix.shape[0] == int(grid.prod(-1).sum())
        first = int(run.argmax())
        assert run[first:first + n].all() and not mask[run].any()  # one contiguous run, no loss on it
    seq = int(data.lengths.max()) + 8
    src = PackedImageSFTSource(data, seq, 2, 0, 1, seed=1, pad_id=tokenizer.pad_token_id)
    plan = src.plan(0)
    batch = src.to_batch(plan.bins[0])
    images = batch["images"]
    want_pix, want_grid = data.images(plan.bins[0])
    assert torch.equal(images.pixel_values_N3PP, want_pix) and torch.equal(images.grid_thw, want_grid)
    index = images.token_index_BS[batch["tokens"] == tid]
    assert torch.equal(index, torch.arange(int(want_grid.prod(-1).sum()) // 4))
    assert (images.token_index_BS[batch["tokens"] != tid] == -1).all()
    # a sample longer than the sequence is dropped (and counted), never truncated through its image
    short = PackedImageSFTSource(data, int(data.lengths.min()) + 1, 1, 0, 1, seed=1, pad_id=tokenizer.pad_token_id,
                                 overlong="truncate")
    assert short.plan(0).stats["dropped"] == int((data.lengths > int(data.lengths.min()) + 1).sum()) > 0
    assert short.plan(0).stats["truncated"] == 0


def test_bad_image_input_names_file_and_line(tokenizer, image_jsonl):
    from megatron_kimi.data.image_sft import ImageSFTSet
    from megatron_kimi.data.images import ImageProcessing

    lines = image_jsonl.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["messages"][0]["content"][0]["image"] = "missing.png"
    path = image_jsonl.parent / "bad.jsonl"  # beside the images the good line refers to
    path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*missing\.png"):
        ImageSFTSet(path, tokenizer, "<|image|>", ImageProcessing())
    skipped = ImageSFTSet(path, tokenizer, "<|image|>", ImageProcessing(), on_error="skip")
    assert len(skipped) == 1 and skipped.stats["malformed_skipped"] == 1
    forged = json.loads(lines[0])
    forged["messages"][0]["content"][1]["text"] += " <|image|>"
    path.write_text(json.dumps(forged) + "\n")
    with pytest.raises(ValueError, match="placeholder token"):
        ImageSFTSet(path, tokenizer, "<|image|>", ImageProcessing())


def test_vlm_sft_loss_falls(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = run_cli(["sft", "examples/vision/sft_tiny.yaml", f"run_dir={tmp_path}", "data.builtin_num_samples=1200",
                   "logging.tensorboard=false"], cwd=str(REPO), env=env, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) >= 50  # ~20 samples per step (packs of 256 tokens x 4)
    early = sum(r["loss"] for r in recs[:3]) / 3
    late = sum(r["loss"] for r in recs[-3:]) / 3
    assert late < early - 2.5, (early, late)
    assert (tmp_path / "checkpoints" / "latest").is_file()
