"""What a dist checkpoint holds, and whether it is complete — read from its files, no process group.

``python tools/inspect_checkpoint.py PATH [--tensors] [--json]``; PATH is a run dir, its
``checkpoints/`` dir or one ``iter_N`` dir. :func:`verify` raises :class:`CheckpointError` naming the
file for: an unfinished save (``.tmp``), missing ``metadata.json`` / ``.metadata`` / ``common.pt``,
an unreadable index, a shard file that is missing or shorter than the index says.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_kimi.training.ckpt_paths import CheckpointError, resolve

INDEX = ".metadata"


@dataclass
class TensorInfo:
    name: str
    shape: List[int]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class CheckpointInfo:
    path: str
    step: Optional[int]
    layout: dict
    train_state: dict
    contents: list
    optimizer_kind: Optional[str]
    config: dict
    tensors: List[TensorInfo] = field(default_factory=list)
    objects: List[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def model_tensors(self) -> List[TensorInfo]:
        return [t for t in self.tensors if not t.name.startswith("optimizer.")]

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.model_tensors)

    def to_json(self) -> dict:
        return {"path": self.path, "step": self.step, "layout": self.layout, "train_state": self.train_state,
                "contents": self.contents, "optimizer_kind": self.optimizer_kind, "num_params": self.num_params,
                "files": self.files, "bytes": self.bytes, "config": self.config,
                "tensors": [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in self.tensors],
                "objects": self.objects}


def find_checkpoint(path: str | Path) -> Path:
    """A run dir, a checkpoints/ dir (its ``latest``) or a checkpoint dir -> the checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: does not exist")
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"{p}: an unfinished save (.tmp directory); use the last complete checkpoint")
    for candidate in (p, p / "checkpoints"):
        found = resolve(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    if (p / INDEX).is_file():  # metadata.json gone, index present
        return p
    raise CheckpointError(f"{p}: no checkpoint here (no metadata.json / common.pt, no checkpoints/latest)")


def _read_index(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    if not (ckpt / INDEX).is_file():
        raise CheckpointError(f"{ckpt}: missing {INDEX} (the torch_dist index): incomplete or not a dist checkpoint")
    try:
        return FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a corrupt index: name the file and the cause
        raise CheckpointError(f"{ckpt / INDEX}: unreadable ({type(e).__name__}: {e})") from e


def verify(ckpt: Path):
    """Completeness checks; returns (index metadata, common dict)."""
    import torch

    for name in ("metadata.json", "common.pt"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt}: missing {name}: incomplete checkpoint")
    try:
        json.loads((ckpt / "metadata.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / 'metadata.json'}: corrupt ({e})") from e
    meta = _read_index(ckpt)
    need: dict = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing (listed in {INDEX})")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"{f}: truncated ({size} bytes, the index needs {end})")
    try:
        common = torch.load(ckpt / "common.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt / 'common.pt'}: unreadable ({type(e).__name__}: {e})") from e
    return meta, common, need


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = find_checkpoint(path)
    meta, common, files = verify(ckpt)
    ts = dict(common.get("train_state", {}))
    info = CheckpointInfo(path=str(ckpt), step=ts.get("step"), layout=dict(common.get("layout", {})), train_state=ts,
                          contents=list(common.get("contents", [])), optimizer_kind=common.get("optimizer_kind"),
                          config=dict(common.get("config", {})), files=len(files),
                          bytes=sum((ckpt / f).stat().st_size for f in files))
    for name, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            info.tensors.append(TensorInfo(name, list(m.size), str(m.properties.dtype).replace("torch.", "")))
        else:
            info.objects.append(name)
    return info


def format_info(info: CheckpointInfo, tensors: bool = False) -> str:
    lay = info.layout
    m = info.config.get("model", {})
    lines = [
        f"checkpoint   {info.path}",
        f"step         {info.step}   train state {info.train_state}",
        f"layout       tp {lay.get('tp')} x pp {lay.get('pp')} x cp {lay.get('cp')} x dp {lay.get('dp')} (at save time; "
        "loads at any layout)",
        f"contents     {', '.join(info.contents)}; optimizer {info.optimizer_kind}",
        f"model        {info.num_params:,} parameters in {len(info.model_tensors)} tensors"
        + (f"; layers {m.get('num_layers')}, hidden {m.get('hidden_size')}, heads {m.get('num_attention_heads')}"
           f"/{m.get('num_query_groups')}" if m else ""),
        f"files        {info.files} shard files, {info.bytes / 2**20:.1f} MiB; {len(info.tensors)} tensors, "
        f"{len(info.objects)} objects",
    ]
    if tensors:
        width = max((len(t.name) for t in info.tensors), default=10)
        lines.append("")
        lines += [f"{t.name:<{width}}  {str(tuple(t.shape)):<22} {t.dtype}" for t in info.tensors]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="inspect_checkpoint", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="run dir, checkpoints/ dir or iter_N dir")
    ap.add_argument("--tensors", action="store_true", help="list every tensor with its global shape and dtype")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    try:
        info = inspect_checkpoint(args.path)
    except CheckpointError as e:
        print(f"inspect_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info.to_json(), indent=1, default=str) if args.json else format_info(info, args.tensors))
    return 0
