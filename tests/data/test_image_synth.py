"""The synthetic shape-counting task: determinism, answers recounted from pixels, the jsonl round trip."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from megatron_kimi.data.image_synth import (
    BACKGROUND,
    IMAGE_MARKER,
    PALETTE,
    make_image_task,
    parse_image_messages,
    write_image_jsonl,
)
from megatron_kimi.data.images import grid_size, ImageProcessing


def _components(arr: np.ndarray) -> list[tuple[int, int, int]]:
    """4-connected regions of non-background pixels, each as its (unique) RGB colour."""
    fg = np.any(arr != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
    seen = np.zeros_like(fg)
    colours = []
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, region = [(y, x)], set()
        while stack:
            cy, cx = stack.pop()
            region.add(tuple(arr[cy, cx]))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        assert len(region) == 1, f"a shape with several colours: {region}"
        colours.append(region.pop())
    return colours


def test_same_seed_same_bytes_and_prefix_stable():
    a, b = make_image_task(30, seed=7), make_image_task(30, seed=7)
    assert [r["png"] for r in a] == [r["png"] for r in b]
    assert [r["png"] for r in make_image_task(10, seed=7)] == [r["png"] for r in a[:10]]
    assert [r["png"] for r in make_image_task(30, seed=8)] != [r["png"] for r in a]


def test_answers_are_the_shapes_in_the_pixels():
    records = make_image_task(60, seed=1)
    for rec in records:
        arr = np.array(rec["image"])
        assert arr.shape == (rec["height"], rec["width"], 3)
        assert PIL.Image.open(__import__("io").BytesIO(rec["png"])).tobytes() == rec["image"].tobytes()
        colours = _components(arr)
        assert rec["answer"] == str(rec["count"]) == str(len(colours)) == str(len(rec["shapes"]))
        assert set(colours) <= set(PALETTE.values())
        assert rec["question"] == "How many shapes are in the image?"
    assert {int(r["answer"]) for r in make_image_task(200, seed=2)} == set(range(1, 10))


def test_colour_question_counts_only_that_colour():
    for rec in make_image_task(60, seed=3, question="color"):
        colour = rec["question"].split()[2]
        assert rec["question"] == f"How many {colour} shapes are in the image?"
        colours = Counter(_components(np.array(rec["image"])))
        assert rec["answer"] == str(colours[PALETTE[colour]])
        assert 1 <= int(rec["answer"]) <= 9 and sum(colours.values()) <= 9


def test_sizes_and_grids_vary_and_shapes_sit_in_their_own_patch():
    records = make_image_task(100, seed=4)
    assert all(28 <= r["width"] <= 112 and 28 <= r["height"] <= 112 for r in records)
    grids = {grid_size(r["height"], r["width"], ImageProcessing()) for r in records}
    assert len(grids) >= 6
    for rec in records:
        cells = [(x0 // 14, y0 // 14) for x0, y0, x1, y1 in (s["box"] for s in rec["shapes"])]
        assert all((x0 // 14, y0 // 14) == (x1 // 14, y1 // 14) for x0, y0, x1, y1 in
                   (s["box"] for s in rec["shapes"]))
        assert len(set(cells)) == len(cells)


@pytest.mark.parametrize("inline", [False, True])
def test_jsonl_round_trip(tmp_path, inline):
    records = make_image_task(5, seed=5)
    path = write_image_jsonl(records, tmp_path / "sub" / "task.jsonl", inline_base64=inline)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 5
    for rec, line in zip(records, lines):
        user, assistant = line["messages"]
        ref = user["content"][0]["image"]
        assert ref.startswith("data:image/png;base64,") if inline else ref == ref.lstrip("/")
        assert line["answer"] == assistant["content"] == rec["answer"]
        messages, images = parse_image_messages(line["messages"], base_dir=path.parent)
        assert messages == [{"role": "user", "content": IMAGE_MARKER + rec["question"]},
                            {"role": "assistant", "content": rec["answer"]}]
        assert len(images) == 1 and np.array_equal(np.array(images[0]), np.array(rec["image"]))
    if not inline:
        assert sorted(p.name for p in (tmp_path / "sub" / "task_images").iterdir())[0] == "000000.png"


def test_custom_image_dir_is_relative_to_the_jsonl(tmp_path):
    path = write_image_jsonl(make_image_task(2, seed=6), tmp_path / "d.jsonl", image_dir="pics")
    ref = json.loads(path.read_text().splitlines()[1])["messages"][0]["content"][0]["image"]
    assert ref == "pics/000001.png" and (tmp_path / ref).is_file()
    with pytest.raises(ValueError, match="not both"):
        write_image_jsonl([], tmp_path / "e.jsonl", image_dir="x", inline_base64=True)
    with pytest.raises(ValueError, match="record 0 needs a string 'answer'"):
        write_image_jsonl([{"question": "q", "answer": 3, "png": b""}], tmp_path / "f.jsonl")


def test_parse_accepts_several_images_and_plain_strings(tmp_path):
    a, b = make_image_task(2, seed=9)
    messages = [
        {"role": "system", "content": "Count."},
        {"role": "user", "content": [{"type": "text", "text": "First "}, {"type": "image", "image": a["image"]},
                                     {"type": "text", "text": " then "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                      + __import__("base64").b64encode(b["png"]).decode()}}],
         "name": "kept"},
        {"role": "assistant", "content": "3"},
    ]
    out, images = parse_image_messages(messages)
    assert out[1] == {"role": "user", "content": f"First {IMAGE_MARKER} then {IMAGE_MARKER}", "name": "kept"}
    assert [np.array(i).tolist() for i in images] == [np.array(a["image"]).tolist(), np.array(b["image"]).tolist()]


def test_parse_errors_name_message_and_part(tmp_path):
    img = {"type": "image", "image": "missing.png"}
    cases = [
        ([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video", "video": "v"}]}],
         r"message 0 part 1: unknown part type 'video'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image"}]}],
         r"message 1 part 0: image part has no 'image' field"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"message 0 part 0: text part needs a string 'text'"),
        ([{"role": "user", "content": [{"text": "x"}]}], r"message 0 part 0: has no 'type'"),
        ([{"role": "user", "content": ["x"]}], r"message 0 part 0: must be an object"),
        ([{"role": "user"}], r"message 0 has no 'content'"),
        ([{"role": "user", "content": 3}], r"message 0 content must be a string or a list"),
        ([{"role": "user", "content": [img]}], r"message 0 part 0: image file not found.*missing\.png"),
        ([{"role": "user", "content": f"look {IMAGE_MARKER}"}], r"message 0: text contains the image marker"),
        ("hello", r"messages must be a list"),
    ]
    for messages, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            parse_image_messages(messages, base_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="question"):
        make_image_task(1, seed=0, question="area")
    with pytest.raises(ValueError, match="max_count"):
        make_image_task(1, seed=0, max_side=28, max_count=9)
    with pytest.raises(ValueError, match="min_side"):
        make_image_task(1, seed=0, min_side=10)
    with pytest.raises(ValueError, match="n must be"):
        make_image_task(-1, seed=0)
