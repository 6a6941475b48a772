"""A synthetic image task with verifiable answers: count the coloured shapes on a plain canvas.

Multimodal training needs image data that a tiny model (2-layer LM + 2-layer tower) can learn in a few
hundred steps and that a math verifier can score, so the answer is a bare integer (1..9). To keep it
learnable the shapes are large (8..12 px), solid, high-contrast on white, and each sits inside its own
14x14 cell of the canvas: cells coincide with the tower's patches (padding goes right/bottom only and
small canvases are never resized), so counting shapes is counting non-blank patches. Canvas sides are
drawn from 28..112 px, so grids (and so token counts) differ from image to image, as real data does.

Samples are drawn from ``np.random.default_rng([seed, i])``: sample ``i`` is the same whatever ``n`` is.

The jsonl is HF chat-template style: a user turn whose content is a list of parts
(``{"type": "image", "image": ...}``, ``{"type": "text", "text": ...}``) and an assistant turn with the
answer. :func:`parse_image_messages` turns that back into plain-string turns, each image part replaced by
:data:`IMAGE_MARKER`, plus the images in order, which is what the tokenizer side expands into
``num_image_tokens`` placeholders.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

from megatron_kimi.data.images import load_image

IMAGE_MARKER = "<image>"
CELL = 14  # one tower patch: one shape per cell
BACKGROUND = (255, 255, 255)
# saturated, far apart in RGB: a shape's colour is recoverable exactly from its pixels (no anti-aliasing)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 150, 0),
    "blue": (0, 0, 230),
    "black": (0, 0, 0),
}
SHAPES = ("square", "circle")
QUESTIONS = ("count", "color")
_MIN_SHAPE, _MAX_SHAPE = 8, 12  # px; with a >=1 px margin in a 14 px cell, neighbours are >=2 px apart


def _question(kind: str, colour: str) -> str:
    if kind == "count":
        return "How many shapes are in the image?"
    return f"How many {colour} shapes are in the image?"


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _sample(rng: np.random.Generator, min_side: int, max_side: int, max_count: int, question: str) -> dict:
    count = int(rng.integers(1, max_count + 1))
    colours = list(PALETTE)
    target = colours[int(rng.integers(len(colours)))]
    distractors = int(rng.integers(0, max_count - count + 1)) if question == "color" else 0
    total = count + distractors
    while True:  # sides until the canvas has a cell for every shape (feasible: checked by the caller)
        width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        cols, rows = width // CELL, height // CELL
        if cols * rows >= total:
            break
    cells = rng.choice(cols * rows, size=total, replace=False)
    image = PIL.Image.new("RGB", (width, height), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    shapes = []
    for j, cell in enumerate(cells):
        if question == "count":
            colour = colours[int(rng.integers(len(colours)))]
        elif j < count:
            colour = target
        else:
            colour = colours[int(rng.integers(len(colours) - 1))]
            colour = colour if colour != target else colours[-1]
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(rng.integers(_MIN_SHAPE, _MAX_SHAPE + 1))
        x0 = int(cell % cols) * CELL + int(rng.integers(1, CELL - size))
        y0 = int(cell // cols) * CELL + int(rng.integers(1, CELL - size))
        box = [x0, y0, x0 + size - 1, y0 + size - 1]
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=PALETTE[colour])
        shapes.append({"kind": kind, "color": colour, "box": box})
    answer = str(count)
    return {"image": image, "png": _png(image), "question": _question(question, target), "answer": answer,
            "count": count, "width": width, "height": height, "shapes": shapes}


def make_image_task(
    n: int,
    seed: int,
    *,
    min_side: int = 28,
    max_side: int = 112,
    max_count: int = 9,
    question: str = "count",
) -> list[dict[str, Any]]:
    """``n`` samples: ``{"image": PIL RGB, "png": bytes, "question", "answer": "K", "count": K, "width",
    "height", "shapes": [{"kind", "color", "box": [x0, y0, x1, y1]}]}``.

    ``question="count"``: how many shapes (any colour); ``"color"``: how many of one named colour, with
    shapes of other colours as distractors. ``count`` is uniform in ``1..max_count``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if not (CELL <= min_side <= max_side):
        raise ValueError(f"need {CELL} <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if not 1 <= max_count <= (max_side // CELL) ** 2:
        raise ValueError(f"max_count must be in 1..{(max_side // CELL) ** 2} (cells of a {max_side} px canvas), "
                         f"got {max_count}")
    return [_sample(np.random.default_rng([seed, i]), min_side, max_side, max_count, question) for i in range(n)]


def _record_png(rec: Mapping[str, Any], i: int) -> bytes:
    if isinstance(rec.get("png"), (bytes, bytearray)):
        return bytes(rec["png"])
    if isinstance(rec.get("image"), PIL.Image.Image):
        return _png(rec["image"])
    raise ValueError(f"record {i} has neither 'png' bytes nor a PIL 'image'")


def write_image_jsonl(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    image_dir: str | Path | None = None,
    inline_base64: bool = False,
) -> Path:
    """Write a chat jsonl, one sample a line; returns ``path``.

    Images go to PNG files under ``image_dir`` (default ``<jsonl stem>_images`` beside the jsonl; a relative
    ``image_dir`` is taken from the jsonl's folder), referenced by paths relative to the jsonl's folder so
    the pair can be moved together; or, with ``inline_base64``, into the line as a data URI.
    """
    path = Path(path)
    if inline_base64 and image_dir is not None:
        raise ValueError("give image_dir or inline_base64, not both")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not inline_base64:
        image_dir = Path(image_dir) if image_dir is not None else Path(f"{path.stem}_images")
        image_dir = image_dir if image_dir.is_absolute() else path.parent / image_dir
        image_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, rec in enumerate(records):
            for key in ("question", "answer"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"record {i} needs a string {key!r}, got {type(rec.get(key)).__name__}")
            png = _record_png(rec, i)
            if inline_base64:
                ref = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            else:
                file = image_dir / f"{i:06d}.png"
                file.write_bytes(png)
                ref = Path(os.path.relpath(file, path.parent)).as_posix()
            line = {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": ref},
                                                 {"type": "text", "text": rec["question"]}]},
                    {"role": "assistant", "content": rec["answer"]},
                ],
                "answer": rec["answer"],
            }
            f.write(json.dumps(line) + "\n")
    return path


def _image_ref(part: Mapping[str, Any], where: str) -> Any:
    if part["type"] == "image_url":  # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
        inner = part.get("image_url")
        ref = inner.get("url") if isinstance(inner, Mapping) else inner
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"{where}: image_url part needs 'image_url': {{'url': <str>}}")
        return ref
    for key in ("image", "url", "path"):  # the keys HF chat templates accept for an image part
        if key in part:
            ref = part[key]
            if isinstance(ref, PIL.Image.Image) or (isinstance(ref, str) and ref):
                return ref
            raise ValueError(f"{where}: image part field {key!r} must be a non-empty string or a PIL image, "
                             f"got {type(ref).__name__}")
    raise ValueError(f"{where}: image part has no 'image' field (nor 'url' / 'path')")


def _check_no_marker(text: str, where: str) -> str:
    if IMAGE_MARKER in text:
        # a literal marker would be expanded like an image and misalign tokens and images
        raise ValueError(f"{where}: text contains the image marker {IMAGE_MARKER!r}")
    return text


def parse_image_messages(
    messages: Sequence[Mapping[str, Any]], base_dir: str | Path | None = None
) -> tuple[list[dict[str, Any]], list[PIL.Image.Image]]:
    """HF-style content parts -> ``(messages with string content, images in order)``.

    Each image part becomes :data:`IMAGE_MARKER` in its message's text (parts concatenated with no
    separator, as HF chat templates do); images load with :func:`load_image` against ``base_dir`` (the
    jsonl's folder). Other message keys are kept. ``ValueError`` names the message and part index.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    images: list[PIL.Image.Image] = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {m} must be an object, got {type(msg).__name__}")
        if "content" not in msg:
            raise ValueError(f"message {m} has no 'content'")
        content = msg["content"]
        if isinstance(content, str):
            out.append({**msg, "content": _check_no_marker(content, f"message {m}")})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"message {m} content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        pieces = []
        for p, part in enumerate(content):
            where = f"message {m} part {p}"
            if not isinstance(part, Mapping):
                raise ValueError(f"{where}: must be an object, got {type(part).__name__}")
            if "type" not in part:
                raise ValueError(f"{where}: has no 'type'")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}: text part needs a string 'text'")
                pieces.append(_check_no_marker(part["text"], where))
            elif part["type"] in ("image", "image_url"):
                ref = _image_ref(part, where)
                try:
                    image = ref.convert("RGB") if isinstance(ref, PIL.Image.Image) else load_image(ref, base_dir)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                images.append(image)
                pieces.append(IMAGE_MARKER)
            else:
                raise ValueError(f"{where}: unknown part type {part['type']!r}; expected 'text', 'image' "
                                 "or 'image_url'")
        out.append({**msg, "content": "".join(pieces)})
    return out, images
