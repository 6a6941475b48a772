"""Image+text SFT data: a chat jsonl whose messages reference images -> packed THD micro-batches with images.

A record is a chat sample (``megatron_kimi/data/chat.py``) whose message contents may be HF-style
part lists with ``{"type": "image", "image": PATH_OR_BASE64}`` (``data/image_synth.py`` parses them).
Each image is decoded and patchified as HF's Kimi-K2.5 processor does (``data/images.py``), and its
place in the text becomes ``h*w/merge**2`` copies of the image placeholder token (``data.image_token``,
added to the tokenizer as an ordinary added token when it has none, so it is matched whole in any
template rendering and never split like a special token), loss 0.

Packing is the text packing (best-fit-decreasing over token lengths; a sample's image tokens count
in its length, so a pack's patch count is bounded by ``merge**2 x seq_length``). A sample longer than
the sequence is dropped and counted, never truncated: a cut would split a placeholder run from its
image, or leave an answer without its question. Each micro-batch carries the images of its samples
in pack order and, per token, the row of the merged image features it takes (``ImageInputs``).

The set is held in memory (decoded patches, not a token cache on disk): enough for the synthetic task
and small image sets; a sharded on-disk image cache is future work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from megatron_kimi.data.chat import parse_record, tokenize_conversation
from megatron_kimi.data.image_synth import IMAGE_MARKER, make_image_task, parse_image_messages, write_image_jsonl
from megatron_kimi.data.images import ImageProcessing, num_image_tokens, preprocess_many
from megatron_kimi.data.sft_source import PackedSFTSource
from megatron_kimi.model.vision.vlm import ImageInputs

BUILTIN_IMAGE_TASK = "builtin:image-count"


def ensure_image_token(tokenizer, token: str) -> int:
    """The id of ``token``, added to ``tokenizer`` (at the end of its vocab) when missing."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        tokenizer.add_tokens([token])
        tid = tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if ids != [tid]:
        raise ValueError(f"data.image_token={token!r} does not tokenize as one token ({ids})")
    return int(tid)


def tokenize_image_sample(tokenizer, record: Any, base_dir: Path, image_token: str, image_token_id: int,
                          processing: ImageProcessing):
    """``(ids int32, mask uint8, pixel_values [N, 3, P, P], grid_thw [n, 3])`` of one jsonl record."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError("expected a JSON object with a 'messages' list")
    text_messages, images = parse_image_messages(record["messages"], base_dir)
    text_messages, _ = parse_record({**record, "messages": text_messages})  # roles, an assistant turn
    for m, msg in enumerate(text_messages):
        if image_token in msg["content"]:
            raise ValueError(f"message {m}: text contains the image placeholder token {image_token!r}")
    text_messages = [{**msg, "content": msg["content"].replace(IMAGE_MARKER, image_token)} for msg in text_messages]
    ids, mask = tokenize_conversation(tokenizer, text_messages)
    slots = np.flatnonzero(ids == image_token_id)
    if len(slots) != len(images):
        raise ValueError(f"{len(images)} image(s) but {len(slots)} placeholder(s) after the chat template")
    if not images:
        P = processing.patch_size
        return ids, mask, torch.zeros(0, 3, P, P), torch.zeros(0, 3, dtype=torch.long)
    pixel_values, grid_thw = preprocess_many(images, processing)
    counts = [num_image_tokens(row, processing.merge_kernel_size) for row in grid_thw.tolist()]
    # each single placeholder becomes its image's run of placeholders (context: loss 0)
    parts_ids, parts_mask, prev = [], [], 0
    for slot, n in zip(slots.tolist(), counts):
        parts_ids += [ids[prev:slot], np.full(n, image_token_id, dtype=ids.dtype)]
        parts_mask += [mask[prev:slot], np.zeros(n, dtype=mask.dtype)]
        prev = slot + 1
    parts_ids.append(ids[prev:])
    parts_mask.append(mask[prev:])
    return np.concatenate(parts_ids), np.concatenate(parts_mask), pixel_values, grid_thw


class ImageSFTSet:
    """The samples of one image chat jsonl, tokenized and patchified (the ``cache`` a source packs)."""

    def __init__(self, path: str | Path, tokenizer, image_token: str, processing: ImageProcessing,
                 on_error: str = "raise"):
        self.source = str(path)
        self.image_token_id = ensure_image_token(tokenizer, image_token)
        self._ids: List[np.ndarray] = []
        self._mask: List[np.ndarray] = []
        self._pixels: List[torch.Tensor] = []
        self._grids: List[torch.Tensor] = []
        lines, skipped = [], 0
        base = Path(path).parent
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    ids, mask, pix, grid = tokenize_image_sample(tokenizer, json.loads(raw), base, image_token,
                                                                 self.image_token_id, processing)
                except (ValueError, json.JSONDecodeError) as e:
                    if on_error == "raise":
                        raise ValueError(f"{path}:{lineno}: {e}") from None
                    skipped += 1
                    continue
                self._ids.append(ids)
                self._mask.append(mask)
                self._pixels.append(pix)
                self._grids.append(grid)
                lines.append(lineno)
        self.source_lines = np.asarray(lines, dtype=np.int64)
        self.lengths = np.asarray([len(i) for i in self._ids], dtype=np.int64)
        self.stats: Dict[str, Any] = {"lines": len(lines) + skipped, "malformed_skipped": skipped,
                                      "images": sum(len(g) for g in self._grids),
                                      "patches": int(sum(int(g.prod(-1).sum()) for g in self._grids))}

    def __len__(self) -> int:
        return len(self._ids)

    def sample(self, i: int):
        return self._ids[i], self._mask[i]

    def images(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of samples ``indices``, concatenated in that order."""
        return (torch.cat([self._pixels[i] for i in indices]), torch.cat([self._grids[i] for i in indices]))


class PackedImageSFTSource(PackedSFTSource):
    """:class:`PackedSFTSource` over an :class:`ImageSFTSet`: micro-batches also carry ``images``."""

    def __init__(self, cache: ImageSFTSet, *args, **kwargs):
        kwargs["overlong"] = "error" if kwargs.get("overlong") == "error" else "drop"
        super().__init__(cache, *args, **kwargs)

    def to_batch(self, bin_indices) -> Dict[str, object]:
        batch = super().to_batch(bin_indices)
        pixel_values, grid_thw = self.cache.images(bin_indices)
        mask_BS = batch["tokens"] == self.cache.image_token_id
        index_BS = torch.where(mask_BS, torch.cumsum(mask_BS.flatten(), 0).view_as(mask_BS) - 1,
                               torch.full_like(batch["tokens"], -1))
        assert int(mask_BS.sum()) == sum(num_image_tokens(r) for r in grid_thw.tolist()), "placeholders vs images"
        batch["images"] = ImageInputs(pixel_values, grid_thw, index_BS)
        return batch


def builtin_image_jsonl(path: Path, num_samples: int, seed: int, slip: float = 0.0) -> Path:
    """The synthetic counting task (``data/image_synth.py``) as a chat jsonl with PNGs beside it.

    ``slip``: the fraction of answers a sloppy teacher gives as count + 1 (a systematic error the
    verifier's reward can remove in RL, as the arithmetic demo's dropped carry; 0: every answer right).
    """
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        records = make_image_task(num_samples, seed)
        rng = np.random.default_rng([seed, 7])  # its own stream: the images do not depend on slip
        for rec in records:
            if slip and rng.random() < slip:
                rec["answer"] = str(rec["count"] + 1)
        tmp = path.with_suffix(".tmp.jsonl")
        write_image_jsonl(records, tmp, image_dir=path.parent / f"{path.stem}_images")
        tmp.rename(path)
    return path

