"""Merging Hugging Face safetensors directories (``tools/merge_checkpoints.py`` with HF inputs): tensor
by tensor with ``safe_open``, sharded output with an index like ``mcore-to-hf`` writes; see
:mod:`megatron_kimi.ckpt_tools.merge` for the weights and the checks."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_kimi.ckpt_tools.merge import _DTYPE_NAMES, MergeError, _accumulate, _prepare_out, check_same_tensors

_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_FLOATS = ("F64", "F32", "F16", "BF16")
_DTYPES_FROM_ST = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# config.json fields that do not describe the model (or, max_position_embeddings, not its weights)
_HF_IGNORED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash",
               "max_position_embeddings")
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.onnx)$"
                          r"|\.index\.json$|^merge_info\.json$")


class HfInput:
    """One HF directory: config.json and the safetensors headers; reads one tensor at a time."""

    def __init__(self, hf_dir: Path, label: str, stack: contextlib.ExitStack):
        from megatron_kimi.convert.hf_to_mcore import read_hf_config, scan_hf_tensors

        self.dir = hf_dir
        self.label = label
        self.config = read_hf_config(hf_dir)
        self.tensors, _ = scan_hf_tensors(hf_dir)  # {name: (file, shape, dtype)}
        self._stack = stack
        self._handles: dict = {}

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.tensors[name][0]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._handles[path].get_tensor(name)


def _natural(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def check_hf_inputs(inputs: Sequence[HfInput], out_dtype: Optional[torch.dtype],
                    log: Callable[[str], None] = lambda m: None) -> Dict[str, Optional[torch.dtype]]:
    """Same config.json (up to :data:`_HF_IGNORED`), tensors and shapes; {name: forced dtype or None}."""
    first = inputs[0]
    for other in inputs[1:]:
        for field in sorted(set(first.config) | set(other.config)):
            a, b = first.config.get(field), other.config.get(field)
            if a == b:
                continue
            if field in _HF_IGNORED:
                if field == "max_position_embeddings":
                    log(f"merge: note: config.json {field} is {a} in {first.label}, {b} in {other.label}; the "
                        "output keeps the first input's")
                continue
            raise MergeError(f"different models: config.json field {field!r} is {a!r} in {first.label} but {b!r} "
                             f"in {other.label}")
        check_same_tensors(first, other)
        for name, (_, shape, _) in first.tensors.items():
            if tuple(other.tensors[name][1]) != tuple(shape):
                raise MergeError(f"different models: tensor {name!r} has shape {list(shape)} in {first.label} but "
                                 f"{list(other.tensors[name][1])} in {other.label}")
    forced: Dict[str, Optional[torch.dtype]] = {}
    for name in first.tensors:
        kinds = {inp.tensors[name][2] for inp in inputs}
        floating = kinds <= set(_ST_FLOATS)
        if out_dtype is not None and floating:
            forced[name] = out_dtype
        elif len(kinds) > 1:
            listing = ", ".join(f"{i.tensors[name][2]} in {i.label}" for i in inputs)
            raise MergeError(f"tensor {name!r} has different dtypes ({listing}): pass --dtype to choose the output's")
        else:
            forced[name] = None
    return forced


def merge_hf(paths: Sequence[Path], out: Path, weights: Sequence[float], out_dtype: Optional[torch.dtype],
             max_shard_size: str | int = "2GB", force: bool = False,
             log: Callable[[str], None] = lambda m: None) -> Path:
    """Merge HF directories ``paths`` into the HF directory ``out`` (see the module docstring)."""
    from safetensors.torch import save_file

    from megatron_kimi.convert.hf import parse_size

    max_bytes = parse_size(max_shard_size)
    with contextlib.ExitStack() as stack:
        inputs = [HfInput(p, f"input {i + 1} ({p})", stack) for i, p in enumerate(paths)]
        forced = check_hf_inputs(inputs, out_dtype, log)
        first = inputs[0]
        order = sorted(first.tensors, key=_natural)

        def nbytes(name: str) -> int:
            _, shape, dt = first.tensors[name]
            item = torch.empty((), dtype=forced[name]).element_size() if forced[name] else _ST_BYTES.get(dt, 4)
            return math.prod(shape) * item

        files: List[List[str]] = [[]]
        used = 0
        for name in order:
            size = nbytes(name)
            if files[-1] and used + size > max_bytes:
                files.append([])
                used = 0
            files[-1].append(name)
            used += size
        fnames = (["model.safetensors"] if len(files) == 1
                  else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
        file_of = {n: fnames[i] for i, group in enumerate(files) for n in group}

        _prepare_out(out, paths, force, lambda c: c.is_file() and bool(_WEIGHT_FILE.search(c.name)))
        total = 0
        for fname, group in zip(fnames, files):
            buffer: Dict[str, torch.Tensor] = {}
            for name in group:
                dt = first.tensors[name][2]
                if dt in _ST_FLOATS:
                    target = forced[name] or _DTYPES_FROM_ST[dt]
                    t = _accumulate(inputs, weights, lambda inp: inp.read(name), target)
                else:
                    t = first.read(name)
                    for other in inputs[1:]:
                        if not torch.equal(t, other.read(name)):
                            raise MergeError(f"tensor {name!r} is not floating point ({dt}) and differs between "
                                             f"{first.label} and {other.label}: it cannot be averaged")
                buffer[name] = t.contiguous()
                total += t.numel() * t.element_size()
            save_file(buffer, str(out / fname), metadata={"format": "pt"})
            del buffer
    if len(fnames) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in sorted(paths[0].iterdir()):
        if f.is_file() and not _WEIGHT_FILE.search(f.name):
            shutil.copy2(f, out / f.name)
    if out_dtype is not None:
        cfg = json.loads((out / "config.json").read_text())
        for k in ("dtype", "torch_dtype"):
            if k in cfg or k == "dtype":
                cfg[k] = _DTYPE_NAMES[out_dtype]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    info = {"inputs": [str(p.resolve()) for p in paths], "weights": list(weights),
            "dtype": _DTYPE_NAMES[out_dtype] if out_dtype else None}
    (out / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

