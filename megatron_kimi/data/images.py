"""Images for multimodal training, preprocessed exactly as Hugging Face's Kimi-K2.5 image processor does.

The vision tower was trained on what ``transformers``' ``Kimi_K25ImageProcessor``
(``models/kimi_k25/image_processing_kimi_k25.py``) produces, so anything else (another resize kernel,
padding on another side, a different patch order) silently shifts its inputs. That processor needs
torchvision, which this environment cannot import; this module redoes its steps with PIL and torch only:

1. ``convert("RGB")`` unless already RGB (HF ``convert_to_rgb``).
2. :func:`target_size`: HF's ``navit_resize``, copied operation for operation (float rounding included).
3. Resize, only when the size changes: torchvision 0.28 ``resize`` on a uint8 CPU tensor with BICUBIC and
   ``antialias=True`` is ``torch.nn.functional.interpolate(uint8, mode="bicubic", align_corners=False,
   antialias=True)`` (torch's native uint8 kernel; torchvision casts nothing), which we call directly on the
   same channels-last uint8 tensor.
4. Zero-pad (uint8 0) on the right and bottom to the padded size, before normalising (so the pad is -1.0).
5. ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32: HF fuses rescale into normalize.
6. Patchify: ``[3, gh*P, gw*P] -> [gh*gw, 3, P, P]``, patches in row-major raster order.

With HF run on CPU (its default) the output is bit-identical: checked against the real HF processor with
torchvision 0.28 on 53 sizes and budgets, and in tests/data/test_images.py (against real torchvision when
importable, else a stand-in for the four torchvision functions HF calls). HF itself is not device-stable:
on a CUDA tensor torchvision casts to float32 before interpolating (then clamps and rounds), and torch's
float bicubic-antialias kernel differs from its uint8 one (which tracks PIL's) by up to ~10 uint8 levels
on noisy images; we match the CPU result.

``max_patches`` is HF's *soft* budget: the scale is computed from ``floor(side / patch)`` counts before the
padding to a multiple of ``patch * merge``, so the final grid may exceed it: up to ``(sqrt(max_patches) +
2) ** 2`` for square images (3% at the default: 1800x2400 px gives 112x150 = 16800 patches), more for thin
ones. We keep HF's rule rather than a strict one: a different grid is a different input to the tower.

The optional DALI path (``preprocess_many(..., backend="dali")``) decodes and resizes on the GPU to the
sizes :func:`target_size` gives, so grids are identical to the PIL path; its resampling kernel is DALI's,
so pixel values are close to, not equal to, HF's.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# HF Kimi_K25ImageProcessor defaults.
HF_MAX_PATCHES = 16384  # patches per image before merging (4096 LLM tokens)
HF_MAX_PATCHES_PER_SIDE = 512  # size={"max_height": 512, "max_width": 512}, counted in patches
HF_IMAGE_MEAN = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
HF_IMAGE_STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_STD
HF_RESCALE_FACTOR = 1 / 255

BACKENDS = ("pil", "dali")

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


@dataclass
class ImageProcessing:
    """How images become patches; the defaults are HF's Kimi-K2.5 processor's."""

    patch_size: int = 14
    merge_kernel_size: int = 2  # the tower merges merge x merge patches into one LLM token
    max_patches: int = HF_MAX_PATCHES
    max_patches_per_side: int = HF_MAX_PATCHES_PER_SIDE
    image_mean: tuple[float, float, float] = HF_IMAGE_MEAN
    image_std: tuple[float, float, float] = HF_IMAGE_STD
    rescale_factor: float = HF_RESCALE_FACTOR

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_kernel_size", "max_patches", "max_patches_per_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageProcessing.{name} must be a positive int, got {value!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"ImageProcessing.{name} must be 3 floats (R, G, B), got {value!r}") from None
            if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
                raise ValueError(f"ImageProcessing.{name} must be 3 finite floats (R, G, B), got {value!r}")
            setattr(self, name, floats)
        if any(v == 0 for v in self.image_std):
            raise ValueError(f"ImageProcessing.image_std must be non-zero, got {self.image_std}")
        if not (isinstance(self.rescale_factor, (int, float)) and math.isfinite(self.rescale_factor)
                and self.rescale_factor > 0):
            raise ValueError(f"ImageProcessing.rescale_factor must be a positive float, got {self.rescale_factor!r}")

    @property
    def side_multiple(self) -> int:
        """Padded sides are multiples of this many pixels (one merge window)."""
        return self.patch_size * self.merge_kernel_size


class TargetSize(NamedTuple):
    """Pixel sizes for one image: resized to ``height x width``, then zero-padded to ``padded_*``."""

    height: int
    width: int
    padded_height: int
    padded_width: int


def target_size(height: int, width: int, cfg: ImageProcessing) -> TargetSize:
    """HF's ``navit_resize``: shrink (never enlarge) to the patch budgets, then pad to whole merge windows.

    Every backend takes its sizes from here, so an image's grid never depends on the backend. The
    arithmetic is HF's own, step for step (``int(h * scale)`` with the same float scale), so the grid is
    identical to HF's, including its rounding.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    p, side = cfg.patch_size, cfg.max_patches_per_side
    # floor counts (HF's): the budget is checked before padding, hence soft
    patches_h = max(1.0, height // p)
    patches_w = max(1.0, width // p)
    scale_total = math.sqrt(cfg.max_patches / (patches_h * patches_w))
    scale_h = (side * p) / height
    scale_w = (side * p) / width
    scale = min(1.0, scale_total, scale_h, scale_w)
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    new_h, new_w = min(new_h, side * p), min(new_w, side * p)
    m = cfg.side_multiple
    return TargetSize(new_h, new_w, (m - new_h % m) % m + new_h, (m - new_w % m) % m + new_w)


def grid_size(height: int, width: int, cfg: ImageProcessing) -> tuple[int, int]:
    """``(h_patches, w_patches)`` of an image of native ``height x width`` pixels."""
    t = target_size(height, width, cfg)
    return t.padded_height // cfg.patch_size, t.padded_width // cfg.patch_size


def num_image_tokens(grid_thw_row: Sequence[int] | torch.Tensor, merge: int = 2) -> int:
    """LLM placeholder tokens of one image: ``t*h*w // merge**2`` (HF's ``grid_thw.prod() // merge**2``)."""
    t, h, w = (int(v) for v in grid_thw_row)
    if h % merge or w % merge:
        raise ValueError(f"grid {t}x{h}x{w} (t x h x w) is not a whole number of {merge}x{merge} merge windows")
    return t * h * w // merge**2


def _short(ref: str, limit: int = 80) -> str:
    return ref if len(ref) <= limit else f"{ref[:48]}...<{len(ref)} chars>"


def _open_bytes(data: bytes, what: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()  # PIL decodes lazily: fail here, with the reference in the message, not in a worker
    except PIL.UnidentifiedImageError:
        raise ValueError(f"cannot decode image {what}: not an image format PIL recognises") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data of a known format
        raise ValueError(f"cannot decode image {what}: {type(e).__name__}: {e}") from None
    return image


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # what HF's load_image does: honour the EXIF orientation, then RGB
    image = PIL.ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(ref: str, base_dir: Path | str | None = None) -> PIL.Image.Image:
    """An RGB image from a file path (relative to ``base_dir``, the jsonl's folder), a
    ``data:image/...;base64,`` URI, or raw base64. ``ValueError`` names the reference when it is none of these.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference must be a non-empty string, got {_short(repr(ref))}")
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ValueError(f"image data URI must start with 'data:image/<type>;base64,': {_short(ref)!r}")
        return _to_rgb(_open_bytes(_b64decode(payload, ref), f"data URI {_short(ref)!r}"))
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a long base64 string is too long a file name
        is_file = False
    if is_file:
        with open(path, "rb") as f:
            return _to_rgb(_open_bytes(f.read(), f"file {str(path)!r}"))
    # '.' never occurs in base64, so 'img/0.png' is a missing file, not a base64 string
    if len(ref) < 16 or not _BASE64_RE.match(ref):
        raise ValueError(f"image file not found: {_short(str(path))!r} (reference {_short(ref)!r})")
    return _to_rgb(_open_bytes(_b64decode(ref, ref), f"base64 {_short(ref)!r} (not a file either)"))


def _b64decode(payload: str, ref: str) -> bytes:
    text = re.sub(r"\s+", "", payload)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64 image data in {_short(ref)!r}: {e}") from None


def _patchify(image_3HW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[3, gh*P, gw*P] -> [gh*gw, 3, P, P]``, patches row-major over the grid (HF's ``patchify``)."""
    c, height, width = image_3HW.shape
    gh, gw = height // patch_size, width // patch_size
    patches = image_3HW.reshape(c, gh, patch_size, gw, patch_size).permute(1, 3, 0, 2, 4)
    return patches.reshape(gh * gw, c, patch_size, patch_size).contiguous()


def _normalize(image_u8: torch.Tensor, cfg: ImageProcessing) -> torch.Tensor:
    # HF fuses rescale into normalize: mean and std scaled by 1/rescale_factor in float32, one sub, one div
    mean_3 = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std_3 = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    return image_u8.to(torch.float32).sub_(mean_3.view(-1, 1, 1)).div_(std_3.view(-1, 1, 1))


def preprocess(image: PIL.Image.Image, cfg: ImageProcessing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> ``(pixel_values_N3PP float32 [N, 3, P, P], grid_thw int64 [1, 3] = (1, gh, gw))``."""
    cfg = cfg or ImageProcessing()
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"preprocess takes a PIL image, got {type(image).__name__} (see load_image)")
    if image.mode != "RGB":
        image = image.convert("RGB")
    t = target_size(image.height, image.width, cfg)
    # channels-last uint8, as torchvision's pil_to_tensor + unsqueeze hands it to interpolate
    image_13HW = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).unsqueeze(0)
    image_13HW = image_13HW.contiguous(memory_format=torch.channels_last)
    if (t.height, t.width) != (image.height, image.width):
        image_13HW = F.interpolate(image_13HW, size=[t.height, t.width], mode="bicubic", align_corners=False,
                                   antialias=True)
    image_13HW = F.pad(image_13HW, (0, t.padded_width - t.width, 0, t.padded_height - t.height), value=0)
    pixel_values_N3PP = _patchify(_normalize(image_13HW[0], cfg), cfg.patch_size)
    p = cfg.patch_size
    grid_thw = torch.tensor([[1, t.padded_height // p, t.padded_width // p]], dtype=torch.int64)
    return pixel_values_N3PP, grid_thw


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}; expected one of {BACKENDS}")
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ValueError(f"backend 'dali' needs nvidia.dali importable ({e}); use backend='pil'") from None
        if not torch.cuda.is_available():
            raise ValueError("backend 'dali' needs a CUDA GPU (torch.cuda.is_available() is False); use backend='pil'")


def preprocess_many(
    images: Sequence[Any], cfg: ImageProcessing | None = None, backend: str = "pil"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> ``(pixel_values_N3PP [sum N_i, 3, P, P], grid_thw [n, 3])``, images in order.

    ``"pil"`` takes PIL images or encoded bytes; ``"dali"`` (GPU decode + resize) takes encoded bytes.
    """
    cfg = cfg or ImageProcessing()
    _check_backend(backend)
    p = cfg.patch_size
    if not images:
        return torch.zeros(0, 3, p, p, dtype=torch.float32), torch.zeros(0, 3, dtype=torch.int64)
    if backend == "dali":
        return _preprocess_many_dali(images, cfg)
    pixels, grids = [], []
    for i, image in enumerate(images):
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = _to_rgb(_open_bytes(bytes(image), f"bytes of image {i}"))
        pixel_values_N3PP, grid_thw = preprocess(image, cfg)
        pixels.append(pixel_values_N3PP)
        grids.append(grid_thw)
    return torch.cat(pixels), torch.cat(grids)


# ---------------------------------------------------------------------------------------------- DALI (GPU)
# Not exercised by the CPU tests (no GPU, no DALI here). Sizes come from target_size, as on the PIL path.


def _preprocess_many_dali(images: Sequence[Any], cfg: ImageProcessing) -> tuple[torch.Tensor, torch.Tensor]:
    from nvidia.dali import fn, pipeline_def, types

    encoded = []
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise ValueError(f"backend 'dali' decodes encoded images: image {i} is {type(image).__name__}, "
                             "not bytes")
        encoded.append(bytes(image))
    sizes = []
    for i, data in enumerate(encoded):
        # header only; exif_transpose as on the PIL path so both see the same height x width
        with PIL.Image.open(io.BytesIO(data)) as im:
            transposed = PIL.ImageOps.exif_transpose(im)
            sizes.append(target_size(transposed.height, transposed.width, cfg))
    scale = 1.0 / cfg.rescale_factor

    @pipeline_def(batch_size=len(encoded), num_threads=2, device_id=torch.cuda.current_device())
    def pipe_fn():
        data = fn.external_source(name="encoded", dtype=types.UINT8)
        hw = fn.external_source(name="hw", dtype=types.FLOAT)  # [h, w, padded_h, padded_w]
        image = fn.decoders.image(data, device="mixed", output_type=types.RGB, adjust_orientation=True)
        image = fn.resize(image, resize_y=hw[0], resize_x=hw[1], interp_type=types.INTERP_CUBIC, antialias=True,
                          dtype=types.UINT8)
        image = fn.crop(image, crop_h=hw[2], crop_w=hw[3], crop_pos_x=0.0, crop_pos_y=0.0,
                        out_of_bounds_policy="pad", fill_values=0)  # zero pad right/bottom, as HF
        return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[m * scale for m in cfg.image_mean],
                                        std=[s * scale for s in cfg.image_std])

    pipe = pipe_fn()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in encoded])
    pipe.feed_input("hw", [np.array(t, dtype=np.float32) for t in sizes])
    (out,) = pipe.run()
    out = out.as_cpu()
    pixels = [_patchify(torch.from_numpy(np.array(out.at(i))), cfg.patch_size) for i in range(len(encoded))]
    p = cfg.patch_size
    grid_thw = torch.tensor([[1, t.padded_height // p, t.padded_width // p] for t in sizes], dtype=torch.int64)
    return torch.cat(pixels), grid_thw
