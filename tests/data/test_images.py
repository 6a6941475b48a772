"""Image preprocessing equals HF's Kimi-K2.5 processor; loading and its errors.

The reference is ``transformers``' own ``Kimi_K25ImageProcessor``, run on CPU. It imports torchvision,
which this venv lacks (the PyPI wheel cannot load beside the CPU torch here). When torchvision imports,
the real one is used; otherwise a stand-in supplies the four functions HF calls (``pil_to_tensor``,
``resize``, ``pad``, ``normalize``), each transcribed from torchvision 0.28's tensor path. Everything else
(``navit_resize``, padding side, the fused rescale+normalize, ``patchify``, ``grid_thw``) is HF's code.
The stand-in was checked bit for bit against real torchvision 0.28 when this was written.
"""

from __future__ import annotations

import base64
import enum
import importlib
import importlib.machinery
import io
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from megatron_kimi.data.images import (
    HF_MAX_PATCHES,
    ImageProcessing,
    grid_size,
    load_image,
    num_image_tokens,
    preprocess,
    preprocess_many,
    target_size,
)

_KIMI = "transformers.models.kimi_k25.image_processing_kimi_k25"


def _torchvision_standin() -> types.ModuleType:
    """``torchvision.transforms.v2.functional`` for the uint8 CPU tensors HF hands it."""
    tvF = types.ModuleType("torchvision.transforms.v2.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def pil_to_tensor(pic):
        img = torch.as_tensor(np.array(pic, copy=True))
        return img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1))

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        assert interpolation == InterpolationMode.BICUBIC and image.device.type == "cpu", "stand-in covers HF's use"
        shape, numel = image.shape, image.numel()
        c, old_h, old_w = shape[-3:]
        new_h, new_w = size
        if (new_h, new_w) == (old_h, old_w):
            return image
        image = image.reshape(-1, c, old_h, old_w)
        strides = image.stride()
        if image.is_contiguous(memory_format=torch.channels_last) and image.shape[0] == 1 and numel != strides[0]:
            image = image.as_strided((1, c, old_h, old_w), [numel, *strides[1:]])
        # torchvision 0.28: BICUBIC on a CPU uint8 tensor uses torch's native uint8 kernel (no float cast)
        image = F.interpolate(image, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=antialias)
        return image.reshape(shape[:-3] + (c, new_h, new_w))

    def pad(image, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = padding
        assert padding_mode == "constant"
        return F.pad(image, [left, right, top, bottom], mode="constant", value=fill)

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        image = image.sub_(mean) if inplace else image.sub(mean)
        return image.div_(std)

    for fn in (InterpolationMode, pil_to_tensor, resize, pad, normalize):
        setattr(tvF, fn.__name__, fn)
    return tvF


def _real_torchvision() -> bool:
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision.transforms.v2.functional")
        return True
    except Exception:  # absent, or present but unloadable (its C ops do not match this torch)
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        return False


@pytest.fixture(scope="module")
def hf():
    """HF's processor with its defaults, built offline."""
    # transformers caches "is torchvision available" on first use: settle it before any stand-in exists
    from transformers import image_processing_backends as backends
    from transformers.image_utils import PILImageResampling

    mp = pytest.MonkeyPatch()
    had_kimi = _KIMI in sys.modules
    if not _real_torchvision():
        tvF = _torchvision_standin()
        pkgs = {name: types.ModuleType(name) for name in
                ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")}
        pkgs["torchvision.transforms.v2"].functional = tvF
        for name, mod in {**pkgs, tvF.__name__: tvF}.items():
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name in pkgs)
            mp.setitem(sys.modules, name, mod)
        # transformers saw no torchvision at import: hand its torchvision backend the stand-in
        mp.setattr(backends, "tvF", tvF, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BICUBIC: tvF.InterpolationMode.BICUBIC})
        if had_kimi:
            mp.delitem(sys.modules, _KIMI)
    try:
        yield importlib.import_module(_KIMI).Kimi_K25ImageProcessor()
    finally:
        mp.undo()
        if not had_kimi:
            sys.modules.pop(_KIMI, None)  # bound to the stand-in: nobody else should get this copy


def _noise(height: int, width: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    arr = np.random.default_rng([seed, height, width]).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(arr).convert(mode)


def _hf(hf, images, max_patches=None):
    kw = {} if max_patches is None else {"max_patches": max_patches}
    out = hf(images=images, return_tensors="pt", **kw)
    return out["pixel_values"], out["image_grid_thw"]


def test_hf_defaults_are_ours(hf):
    cfg = ImageProcessing()
    assert (cfg.patch_size, cfg.merge_kernel_size, cfg.max_patches) == (hf.patch_size, hf.merge_size,
                                                                         hf.max_patches) == (14, 2, HF_MAX_PATCHES)
    assert cfg.max_patches_per_side == hf.size["max_height"] == hf.size["max_width"]
    assert cfg.image_mean == tuple(hf.image_mean) and cfg.image_std == tuple(hf.image_std)
    assert cfg.rescale_factor == hf.rescale_factor


@pytest.mark.parametrize(
    "height,width,max_patches",
    [
        (20, 33, None),  # small: no resize, pad to 28x56
        (56, 56, None),  # already whole merge windows: untouched
        (1, 1, None),
        (13, 7, None),  # smaller than a patch
        (29, 57, None),
        (101, 73, None),  # odd sides
        (1800, 2400, None),  # over the default budget: shrinks
        (10, 8000, None),  # over the per-side cap (512 patches)
        (300, 500, 64),  # a small budget forces a shrink
        (777, 555, 1000),
        (40, 900, 16),  # thin and shrunk
    ],
)
def test_matches_hf_bit_for_bit(hf, height, width, max_patches):
    image = _noise(height, width)
    cfg = ImageProcessing() if max_patches is None else ImageProcessing(max_patches=max_patches)
    pixel_values_N3PP, grid_thw = preprocess(image, cfg)
    hf_pixels, hf_grid = _hf(hf, [image], max_patches)
    assert torch.equal(grid_thw, hf_grid) and grid_thw.dtype == torch.int64
    assert pixel_values_N3PP.dtype == torch.float32 and pixel_values_N3PP.shape == hf_pixels.shape
    assert torch.equal(pixel_values_N3PP, hf_pixels)
    _, gh, gw = grid_thw[0].tolist()
    assert pixel_values_N3PP.shape == (gh * gw, 3, 14, 14)
    assert gh % 2 == 0 and gw % 2 == 0 and (gh, gw) == grid_size(height, width, cfg)


def test_many_images_and_other_modes_match_hf(hf):
    base = [_noise(40, 50, 1), _noise(90, 30, 2), _noise(300, 200, 3)]
    images = [*base, base[0].convert("L"), base[1].convert("RGBA"), base[2].convert("P")]
    cfg = ImageProcessing(max_patches=100)
    pixel_values_N3PP, grid_thw = preprocess_many(images, cfg)
    hf_pixels, hf_grid = _hf(hf, images, 100)
    assert torch.equal(grid_thw, hf_grid) and torch.equal(pixel_values_N3PP, hf_pixels)
    # encoded bytes go the same way as the decoded image
    buf = io.BytesIO()
    base[2].save(buf, format="PNG")
    from_bytes, grid_b = preprocess_many([buf.getvalue()], cfg)
    assert torch.equal(grid_b, grid_thw[2:3]) and torch.equal(from_bytes, preprocess(base[2], cfg)[0])


def test_patch_order_is_row_major_and_padding_is_right_bottom():
    # each 14x14 block of a 28x42 image has its own grey level: patch k must carry block k in raster order
    arr = np.zeros((28, 42, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 10 * (r * 3 + c) + 5
    pixel_values_N3PP, grid_thw = preprocess(PIL.Image.fromarray(arr))
    assert grid_thw.tolist() == [[1, 2, 4]]  # width 42 pads to 56
    want = torch.tensor([5, 15, 25, -1, 35, 45, 55, -1], dtype=torch.float32)
    level = pixel_values_N3PP[:, 0, 0, 0]
    assert torch.allclose(level[[3, 7]], torch.tensor(-1.0))  # padding is uint8 0 -> -1
    assert torch.allclose(level[[0, 1, 2, 4, 5, 6]], (want[[0, 1, 2, 4, 5, 6]] - 127.5) / 127.5)
    assert (pixel_values_N3PP.amin(dim=(1, 2, 3)) == pixel_values_N3PP.amax(dim=(1, 2, 3))).all()


def test_resize_policy_never_upscales_caps_sides_and_keeps_whole_windows():
    cfg = ImageProcessing()
    for h, w in [(5, 5), (20, 33), (111, 112), (1000, 700)]:
        t = target_size(h, w, cfg)
        assert (t.height, t.width) == (h, w)  # under budget: not resized at all
        assert t.padded_height - h in range(28) and t.padded_width - w in range(28)
    rng = np.random.default_rng(0)
    for budget in (16, 64, 256, 1000, HF_MAX_PATCHES):
        c = ImageProcessing(max_patches=budget, max_patches_per_side=64)
        for h, w in rng.integers(1, 9000, size=(200, 2)):
            t = target_size(int(h), int(w), c)
            assert t.height <= h and t.width <= w
            assert t.padded_height % 28 == 0 and t.padded_width % 28 == 0
            gh, gw = grid_size(int(h), int(w), c)
            assert gh <= 64 and gw <= 64  # per-side cap
            # HF's budget binds floor(side/14) counts: the scale is at most sqrt(budget / those)
            floors = max(1, h // 14) * max(1, w // 14)
            assert t.height * t.width <= h * w * min(1.0, budget / floors) + 1e-6


def test_budget_is_hfs_soft_one():
    """HF checks the budget on floor(side / 14) counts before padding to whole merge windows, so a shrunk
    image's grid can pass it: for square images by up to (sqrt(budget) + 2) ** 2. 1800x2400 px has 128x171
    floor patches, HF scales it by sqrt(16384 / 21888) to 1558x2077 px, whose padded grid is 112x150 =
    16800 patches (2.5% over). That is HF's grid, so it is ours.
    """
    assert grid_size(1800, 2400, ImageProcessing()) == (112, 150)
    for budget in (64, 1024, HF_MAX_PATCHES):
        cfg = ImageProcessing(max_patches=budget)
        worst = max(np.prod(grid_size(side, side, cfg)) for side in range(14, 9000, 37))
        assert budget < worst <= (budget**0.5 + 2) ** 2


def test_num_image_tokens():
    assert num_image_tokens([1, 4, 6]) == 6
    assert num_image_tokens(torch.tensor([1, 112, 150])) == 4200
    assert num_image_tokens((1, 6, 6), merge=3) == 4
    with pytest.raises(ValueError, match="merge windows"):
        num_image_tokens([1, 3, 4])


def test_config_validation_names_the_field():
    for kwargs, field in [({"patch_size": 0}, "patch_size"), ({"max_patches": -5}, "max_patches"),
                          ({"merge_kernel_size": 1.5}, "merge_kernel_size"),
                          ({"max_patches_per_side": True}, "max_patches_per_side"),
                          ({"image_mean": (0.5, 0.5)}, "image_mean"), ({"image_std": (0.5, 0.0, 0.5)}, "image_std"),
                          ({"image_std": "abc"}, "image_std"), ({"rescale_factor": 0}, "rescale_factor")]:
        with pytest.raises(ValueError, match=field):
            ImageProcessing(**kwargs)
    assert ImageProcessing(image_mean=[0.1, 0.2, 0.3]).image_mean == (0.1, 0.2, 0.3)


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_from_paths_and_base64(tmp_path):
    image = _noise(17, 23, mode="RGBA")
    (tmp_path / "imgs").mkdir()
    image.save(tmp_path / "imgs" / "a.png")
    want = np.array(image.convert("RGB"))
    b64 = base64.b64encode(_png_bytes(image)).decode()
    loaded = [
        load_image("imgs/a.png", tmp_path),  # relative to the jsonl's folder
        load_image(str(tmp_path / "imgs" / "a.png"), None),  # absolute
        load_image(str(tmp_path / "imgs" / "a.png"), tmp_path / "elsewhere"),  # absolute ignores base_dir
        load_image("data:image/png;base64," + b64),
        load_image(b64),  # raw base64
        load_image("\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))),  # MIME-wrapped base64
        load_image(base64.urlsafe_b64encode(_png_bytes(image)).decode().rstrip("=")),
    ]
    for im in loaded:
        assert im.mode == "RGB" and np.array_equal(np.array(im), want)


def test_load_image_errors_name_the_reference(tmp_path):
    with pytest.raises(ValueError, match=r"not found.*imgs/missing\.png"):
        load_image("imgs/missing.png", tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot decode image file.*junk\.png"):
        load_image("junk.png", tmp_path)
    long_junk = base64.b64encode(b"\x00garbage" * 500).decode()
    with pytest.raises(ValueError, match=r"cannot decode image base64") as err:
        load_image(long_junk)
    assert len(str(err.value)) < 400 and f"<{len(long_junk)} chars>" in str(err.value)  # truncated
    with pytest.raises(ValueError, match="invalid base64"):
        load_image("data:image/png;base64,abc$%^")
    with pytest.raises(ValueError, match="invalid base64"):
        load_image("QUJD" * 10 + "A")  # bad padding
    with pytest.raises(ValueError, match="data:image/<type>;base64"):
        load_image("data:text/plain,hello")
    with pytest.raises(ValueError, match="non-empty string"):
        load_image("")


def test_backends():
    image = _noise(30, 30)
    with pytest.raises(ValueError, match="unknown image backend"):
        preprocess_many([image], backend="cv2")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="dali"):
            preprocess_many([image], backend="dali")
    pixel_values_N3PP, grid_thw = preprocess_many([])
    assert pixel_values_N3PP.shape == (0, 3, 14, 14) and grid_thw.shape == (0, 3)
