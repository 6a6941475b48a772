"""Image prompts for RL with a VLM (``model.vision``): a prompt's images -> its token ids and tower inputs.

A prompt's ``images`` (paths, relative to the prompts file, or base64) go where its text has the image
marker (``data/image_synth.py``; before the text when it has none), each as ``h*w/merge**2`` copies of
the image placeholder token, exactly as SFT lays them out (``data/image_sft.py``), so a policy trained
by image SFT sees the same prompts in RL. The samples carry the images to the trainer's packs, the
built-in engine prefills their features (``rollout/model_runner.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_kimi.data.image_sft import ensure_image_token
from megatron_kimi.data.image_synth import IMAGE_MARKER, make_image_task
from megatron_kimi.data.images import ImageProcessing, load_image, num_image_tokens, preprocess_many
from megatron_kimi.model.vision.vlm import ImageInputs
from megatron_kimi.rl.data import prompt_token_ids
from megatron_kimi.rl.types import Prompt

BUILTIN_IMAGE_PROMPTS = "builtin:image-count"


class PromptImages:
    """Encodes prompts with images (memoised per prompt: a prompt is sampled k times per iteration)."""

    def __init__(self, tokenizer, image_token: str, processing: ImageProcessing):
        self.tokenizer, self.image_token, self.processing = tokenizer, image_token, processing
        self.image_token_id = ensure_image_token(tokenizer, image_token)
        self._memo: Dict[int, Tuple[List[int], Optional[ImageInputs]]] = {}

    def encode(self, prompt: Prompt) -> Tuple[List[int], Optional[ImageInputs]]:
        key = id(prompt)
        if key not in self._memo:
            self._memo[key] = self._encode(prompt)
        return self._memo[key]

    def _encode(self, prompt: Prompt) -> Tuple[List[int], Optional[ImageInputs]]:
        refs = prompt.images or []
        if self.image_token in prompt.prompt:
            raise ValueError(f"prompt {prompt.prompt[:60]!r}: text contains the image placeholder token")
        text = prompt.prompt
        if refs and IMAGE_MARKER not in text:
            text = IMAGE_MARKER * len(refs) + text
        if text.count(IMAGE_MARKER) != len(refs):
            raise ValueError(f"prompt {prompt.prompt[:60]!r}: {text.count(IMAGE_MARKER)} image markers for "
                             f"{len(refs)} images")
        ids = prompt_token_ids(self.tokenizer, Prompt(prompt=text.replace(IMAGE_MARKER, self.image_token)))
        if not refs:
            return ids, None
        base = prompt.metadata.get("image_dir")
        pixel_values, grid_thw = preprocess_many([load_image(r, base) for r in refs], self.processing)
        counts = [num_image_tokens(row, self.processing.merge_kernel_size) for row in grid_thw.tolist()]
        out, index, rows = [], [], 0
        slots = iter(counts)
        for t in ids:
            if t != self.image_token_id:
                out.append(t)
                index.append(-1)
                continue
            n = next(slots)
            out += [t] * n
            index += list(range(rows, rows + n))
            rows += n
        return out, ImageInputs(pixel_values, grid_thw, torch.tensor([index], dtype=torch.long))


def image_count_prompts(n: int, seed: int) -> List[Prompt]:
    """The synthetic counting task as RL prompts (images inline as PNG data URIs), exact-match reward."""
    import base64

    out = []
    for rec in make_image_task(n, seed):
        uri = "data:image/png;base64," + base64.b64encode(rec["png"]).decode()
        out.append(Prompt(prompt=IMAGE_MARKER + rec["question"], answer=rec["answer"], kind="exact",
                          images=[uri], difficulty=float(rec["count"])))
    return out


def absolute_image_refs(prompt: Prompt) -> List[str]:
    """The prompt's image references usable from anywhere: paths made absolute against the prompts file's
    folder (base64 and data URIs as they are)."""
    base = prompt.metadata.get("image_dir")
    out = []
    for ref in prompt.images or []:
        try:  # load_image's rule: a reference naming an existing file is a path, anything else data
            is_file = bool(base) and not ref.startswith("data:") and Path(base, ref).is_file()
        except OSError:  # a long base64 string is too long a file name
            is_file = False
        out.append(str(Path(base, ref).resolve()) if is_file else ref)
    return out


def user_content(prompt: Prompt):
    """The prompt as a chat user turn's content: its text, or for an image prompt HF-style parts (image
    parts where its text has the marker, else first; absolute paths), which image SFT reads back."""
    if not prompt.images:
        return prompt.prompt
    refs = absolute_image_refs(prompt)
    text = prompt.prompt if IMAGE_MARKER in prompt.prompt else IMAGE_MARKER * len(refs) + prompt.prompt
    pieces = text.split(IMAGE_MARKER)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image", "image": refs[i - 1]})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def pack_images(samples, indices: List[int], capacity: int) -> Optional[ImageInputs]:
    """The images of the samples ``indices`` of one pack (in pack order) with their per-token feature
    index over the pack's ``capacity`` tokens; None when none of them has images."""
    if all(samples[i].images is None for i in indices):
        return None
    index = np.full(capacity, -1, dtype=np.int64)
    pix, grids, start, rows = [], [], 0, 0
    for i in indices:
        s = samples[i]
        if s.images is not None:
            idx = s.images.token_index_BS[0].numpy()
            at = np.flatnonzero(idx >= 0)
            index[start + at] = idx[at] + rows
            pix.append(s.images.pixel_values_N3PP)
            grids.append(s.images.grid_thw)
            rows += int(at.size)
        start += s.length
    return ImageInputs(torch.cat(pix), torch.cat(grids), torch.from_numpy(index)[None])


def check_image_rl(cfg) -> None:
    """What RL with images does not support yet (clear errors before anything runs)."""
    if cfg.rollout.engine != "builtin":
        raise ValueError(f"rollout.engine={cfg.rollout.engine!r}: image prompts need the built-in engine "
                         "(the vLLM backends do not take the tower's features yet)")
    if cfg.rollout.partial_budget:
        raise ValueError("rollout.partial_budget: partial rollouts do not carry images yet (set it to 0)")

