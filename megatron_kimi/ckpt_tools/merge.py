"""Model merging (Kimi k1.5 §2.4, long2short): a weighted average of checkpoints, tensor by tensor.

``python tools/merge_checkpoints.py A B [C ...] --weights 0.5 0.5 --out D [--tp N --pp N] [--dtype bf16]``

Every output tensor is ``sum_i w_i * input_i`` (weights one per input, summing to 1 unless
``--allow-unnormalized``; the default is the plain mean), accumulated in fp64 (fp32 when every input
and the output are 16-bit) and cast once to the output dtype: the inputs' (they must agree, else
``--dtype``).

Megatron checkpoints (any mix of TP/PP layouts: the dist checkpoints of ``sft``/``rl``/``train``, of
``hf-to-mcore``, ``reshard_checkpoint``; a run dir, its ``checkpoints/`` dir or an ``iter_N`` dir):
read and written straight at the ``torch.distributed.checkpoint`` level, in one process, with no
process group and without building a model. The saved global tensors are the same at every layout;
one unit (a tensor, or one layer of a stacked ``decoder.layers.*`` tensor) is read from each input in
turn (only the saved chunks that overlap it), accumulated, cast, cut into the chunks a save at the
output layout (``--tp``/``--pp``, default: the first input's) writes and appended to the file of the
rank that owns each chunk (``__<rank>_0.distcp``, rank = pp_rank * tp + tp_rank). Peak memory is one
unit (plus the fp64 accumulator) and one saved chunk, never a model. The output ``D`` is a checkpoint
root like ``hf-to-mcore`` writes: ``D/latest``, ``D/iter_0000000`` (weights only: common ``contents``
== ["model"], no optimizer, scheduler or RNG state, train state at step 0; the first input's config
with the output layout; the HF record, so ``mcore-to-hf`` finds the architecture and tokenizer),
``D/model_config.yaml`` and ``D/tokenizer/`` when the first input's HF record has one. It loads with
``checkpoint.load=D`` in ``sft``/``rl`` (a weights-only start), in ``reshard_checkpoint`` and
``mcore-to-hf``.

Hugging Face directories (safetensors, e.g. from ``mcore-to-hf``): tensor by tensor with
``safe_open``; the output is sharded like the converter writes (``--max-shard-size``, an index when
there is more than one file; a file is written and freed as soon as its last tensor is ready), with
``config.json`` (dtype updated for ``--dtype``), tokenizer and the other non-weight files copied from
the first input, and ``merge_info.json``. Mixing the two formats is an error (convert first).

Inputs of different models are refused before anything is written: a model config field that differs
(``model.hidden_size``, or the field of ``config.json``) or a tensor that is missing or has another
shape is a :class:`MergeError` (a ``ValueError``) naming it, the inputs and both values.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_kimi.training.checkpoint import write_latest
from megatron_kimi.training.ckpt_paths import LATEST, CheckpointError, iter_dir_name, resolve


class MergeError(ValueError):
    """Inputs that cannot be merged (different models, dtypes, formats) or bad arguments."""


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}
WEIGHT_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------
# Arguments shared by both formats
# --------------------------------------------------------------------------------------------


def check_weights(weights: Optional[Sequence[float]], n: int, allow_unnormalized: bool = False) -> List[float]:
    """One weight per input (default: 1/n each), summing to 1 unless ``allow_unnormalized``."""
    if n < 1:
        raise MergeError("no inputs to merge")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} inputs: give exactly one weight per input")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights {weights}: every weight must be a finite number")
    total = math.fsum(weights)
    if not allow_unnormalized and abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise MergeError(f"weights {weights} sum to {total:.9g}, not 1 (pass --allow-unnormalized to merge "
                         "with them anyway)")
    return weights


def check_same_tensors(first, other) -> None:
    """MergeError naming a tensor that one input (``.tensors``, ``.label``) has and the other lacks."""
    for a, b in ((first, other), (other, first)):
        for key in a.tensors:
            if key not in b.tensors:
                raise MergeError(f"different models: tensor {key!r} is in {a.label} but not in {b.label}")


def _accumulate(inputs, weights: Sequence[float], read: Callable, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum_i w_i * read(inputs[i])`` with one input tensor materialized at a time, cast once."""
    acc = None
    acc_dtype = torch.float32
    for inp, w in zip(inputs, weights):
        t = read(inp)
        if acc is None:
            wide = t.element_size() >= 4 or torch.empty((), dtype=out_dtype).element_size() >= 4
            acc_dtype = torch.float64 if wide else torch.float32
            acc = t.to(acc_dtype) * w
        else:
            if tuple(t.shape) != tuple(acc.shape):  # the metadata said otherwise: a corrupt input
                raise MergeError(f"read a tensor of shape {list(t.shape)} from {inp.label}, expected "
                                 f"{list(acc.shape)}")
            acc.add_(t.to(acc_dtype), alpha=w)
        del t
    return acc.to(out_dtype)


def _out_dtype_arg(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise MergeError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _prepare_out(out: Path, inputs: Sequence[Path], force: bool, ours: Callable[[Path], bool]) -> None:
    """Refuse an output that is (inside) an input or not empty (unless ``force``: remove our files)."""
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise MergeError(f"output {out} overlaps the input {p}: write the merged model elsewhere")
    if o.exists() and not o.is_dir():
        raise MergeError(f"output {out} exists and is not a directory")
    if o.is_dir() and any(o.iterdir()):
        if not force:
            raise MergeError(f"output {out} is not empty (pass --force to replace a previous merge there)")
        for child in o.iterdir():
            if ours(child):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    o.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Which format
# --------------------------------------------------------------------------------------------


def input_kind(path: str | Path) -> Tuple[str, Path]:
    """("hf", dir) for a Hugging Face safetensors directory, ("mcore", checkpoint dir) for a Megatron one."""
    from megatron_kimi.ckpt_tools.inspect import find_checkpoint

    p = Path(path)
    if not p.exists():
        raise MergeError(f"{p}: does not exist")
    if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf", p
    try:
        return "mcore", find_checkpoint(p)
    except CheckpointError as e:
        if p.is_dir() and (p / "config.json").is_file():
            raise MergeError(f"{p}: a Hugging Face directory without *.safetensors files (only safetensors "
                             "checkpoints can be merged)") from None
        raise MergeError(f"{p}: neither a megatron_kimi checkpoint nor a Hugging Face safetensors directory "
                         f"({e})") from None


def merge(
    inputs: Sequence[str | Path],
    out: str | Path,
    weights: Optional[Sequence[float]] = None,
    *,
    dtype: Optional[str | torch.dtype] = None,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    allow_unnormalized: bool = False,
    max_shard_size: str | int = "2GB",
    force: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """Write the weighted average of ``inputs`` to ``out``; returns the written checkpoint / HF directory.

    Megatron inputs give a Megatron checkpoint root (returns ``out/iter_0000000``), HF inputs an HF
    directory (returns ``out``). Raises :class:`MergeError` (a ``ValueError``) before anything is
    written when the inputs cannot be merged.
    """
    weights = check_weights(weights, len(inputs), allow_unnormalized)
    kinds = [input_kind(p) for p in inputs]
    found = {k for k, _ in kinds}
    if len(found) > 1:
        hf_in = [str(p) for (k, _), p in zip(kinds, inputs) if k == "hf"]
        mc_in = [str(p) for (k, _), p in zip(kinds, inputs) if k == "mcore"]
        raise MergeError(f"cannot merge Hugging Face directories ({', '.join(hf_in)}) with Megatron checkpoints "
                         f"({', '.join(mc_in)}): convert first (tools/convert_checkpoint.py hf-to-mcore or "
                         "mcore-to-hf), so that every input has the same format")
    out_dtype = _out_dtype_arg(dtype)
    paths = [p for _, p in kinds]
    if found == {"hf"}:
        if tp is not None or pp is not None:
            raise MergeError("--tp/--pp apply to Megatron checkpoints; Hugging Face inputs give a Hugging Face "
                             "directory")
        from megatron_kimi.ckpt_tools.merge_hf import merge_hf  # it imports this module

        return merge_hf(paths, Path(out), weights, out_dtype, max_shard_size, force, log)
    return merge_mcore(paths, Path(out), weights, out_dtype, tp, pp, force, log)


# --------------------------------------------------------------------------------------------
# Megatron dist checkpoints (torch_dist), read and written with torch.distributed.checkpoint
# --------------------------------------------------------------------------------------------

# Not model state: never merged, never written.
_SKIPPED_PREFIXES = ("optimizer.", "rng_state")
# Model config fields that do not change what the weights mean; the output takes the first input's.
_NON_ARCH_FIELDS = ("max_position_embeddings", "init_method_std", "hidden_dropout", "attention_dropout",
                    "transformer_impl", "attention_impl", "make_vocab_size_divisible_by")
# Tensor-parallel axis of a per-layer tensor, by key suffix (Megatron's column / row parallel linears
# and the vocab-parallel embedding / output layer); any other tensor is replicated over TP.
_TP_AXIS = {"word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0, "linear_qkv.bias": 0,
            "linear_fc1.weight": 0, "linear_fc1.bias": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}
_SWIGLU = ("linear_fc1.weight", "linear_fc1.bias")  # [gate; up]: each TP rank holds a slice of both
_LAYERS = "decoder.layers."
_SHARD_SUFFIX = re.compile(r"/shard_([\d.]+)_([\d.]+)$")
_COMMON_KEPT = ("hf", "hf_architecture", "content_metadata")
_FRESH_TRAIN_STATE = {"step": 0, "consumed_samples": 0, "consumed_tokens": 0, "stage": 0}
_MCORE_OUT_FILES = (LATEST, iter_dir_name(0), iter_dir_name(0) + ".tmp", "model_config.yaml", "tokenizer",
                    LATEST + ".tmp")


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, int(o), int(n))
    return t


class _Into:
    """The part of a ``LoadPlanner`` that ``FileSystemReader.read_data`` uses: where each read goes."""

    def __init__(self, dest: Optional[torch.Tensor] = None):
        self.dest = dest
        self.data: Optional[bytes] = None

    def resolve_tensor(self, req):
        return _narrow(self.dest, req.dest_offsets, req.lengths)

    def commit_tensor(self, req, tensor) -> None:
        pass

    def load_bytes(self, req, value: io.BytesIO) -> None:
        self.data = value.getvalue()


class McoreInput:
    """One input checkpoint: its common dict and index; reads any box of a saved tensor."""

    def __init__(self, ckpt_dir: Path, label: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megatron_kimi.ckpt_tools.inspect import verify

        self.ckpt_dir = ckpt_dir
        self.label = label
        self.index, self.common, _ = verify(ckpt_dir)
        self.reader = FileSystemReader(str(ckpt_dir))
        self.reader.set_up_storage_reader(self.index, is_coordinator=True)
        self.tensors = {}
        self.objects = []
        for key, md in self.index.state_dict_metadata.items():
            if key.startswith(_SKIPPED_PREFIXES):
                continue
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = md
            else:
                self.objects.append(key)
        config = self.common.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise MergeError(f"{ckpt_dir}: the checkpoint records no model config (common['config']['model']); "
                             "cannot check that the inputs are the same model")
        self.config = config

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of global tensor ``key`` (its saved dtype)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.tensors[key]
        dest = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [box])
        covered = sum(math.prod(r.lengths) for r in items)
        if covered != dest.numel():
            raise MergeError(f"{self.ckpt_dir}: tensor {key!r}: the saved chunks cover {covered} of the "
                             f"{dest.numel()} elements at offsets {list(offsets)} size {list(sizes)}: an incomplete "
                             "checkpoint")
        self.reader.read_data(LoadPlan(items), _Into(dest)).wait()
        return dest

    def read_object(self, key: str) -> bytes:
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        idx = MetadataIndex(key)
        zero = torch.Size([0])
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=idx, dest_offsets=zero, storage_index=idx,
                        storage_offsets=zero, lengths=zero)
        into = _Into()
        self.reader.read_data(LoadPlan([item]), into).wait()
        return into.data


def _model_fields(model: dict) -> dict:
    """The architecture fields of a saved model config, defaults resolved (None heads/groups/head dim)."""
    from megatron_kimi.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    m = {**defaults, **model}
    if m.get("num_query_groups") is None:
        m["num_query_groups"] = m.get("num_attention_heads")
    if m.get("kv_channels") is None and m.get("num_attention_heads"):
        m["kv_channels"] = m["hidden_size"] // m["num_attention_heads"]
    return {k: v for k, v in m.items() if k not in _NON_ARCH_FIELDS}


def check_mcore_inputs(inputs: Sequence[McoreInput], out_dtype: Optional[torch.dtype],
                       log: Callable[[str], None] = lambda m: None) -> Dict[str, torch.dtype]:
    """Same model config and the same tensors at the same shapes; returns {tensor key: output dtype}."""
    first = inputs[0]
    ref = _model_fields(first.config["model"])
    for other in inputs[1:]:
        got = _model_fields(other.config["model"])
        for field in sorted(set(ref) | set(got)):
            if ref.get(field) != got.get(field):
                raise MergeError(f"different models: config field model.{field} is {ref.get(field)!r} in "
                                 f"{first.label} but {got.get(field)!r} in {other.label}")
        for field in _NON_ARCH_FIELDS:
            a, b = first.config["model"].get(field), other.config["model"].get(field)
            if a != b and field in ("max_position_embeddings",):
                log(f"merge: note: model.{field} is {a} in {first.label}, {b} in {other.label}; the output "
                    f"records {a} (the first input's)")
    dtypes: Dict[str, torch.dtype] = {}
    for other in inputs[1:]:
        check_same_tensors(first, other)
        for key in first.tensors:
            if first.shape(key) != other.shape(key):
                raise MergeError(f"different models: tensor {key!r} has shape {list(first.shape(key))} in "
                                 f"{first.label} but {list(other.shape(key))} in {other.label}")
    for key in first.tensors:
        kinds = {inp.dtype(key) for inp in inputs}
        floating = all(d.is_floating_point for d in kinds)
        if out_dtype is not None and floating:
            dtypes[key] = out_dtype
        elif len(kinds) > 1:
            listing = ", ".join(f"{_DTYPE_NAMES.get(i.dtype(key), i.dtype(key))} in {i.label}" for i in inputs)
            raise MergeError(f"tensor {key!r} has different dtypes ({listing}): pass --dtype to choose the "
                             "output's")
        else:
            dtypes[key] = first.dtype(key)
    return dtypes


@dataclasses.dataclass
class OutputLayout:
    """Which rank of a tp x pp save writes which chunk (the chunks Megatron's save writes at that layout)."""

    tp: int
    pp: int
    num_layers: int

    def stage_of_layer(self, layer: int) -> int:
        return layer // (self.num_layers // self.pp)

    def stage_of(self, key: str) -> int:
        if key.startswith(("output_layer.", "decoder.final_layernorm")):
            return self.pp - 1
        return 0

    def chunks(self, key: str, shape: Tuple[int, ...], layer: Optional[int]):
        """[(rank, offsets, sizes)] of one unit: tensor ``key`` (global ``shape``), or its layer ``layer``."""
        stage = self.stage_of(key) if layer is None else self.stage_of_layer(layer)
        lead = () if layer is None else (layer,)
        body = tuple(shape[1:]) if layer is not None else tuple(shape)
        axis = next((a for suffix, a in _TP_AXIS.items() if key.endswith(suffix)), None)
        halves = 2 if key.endswith(_SWIGLU) else 1  # saved as two chunks per rank, also at tp=1
        if axis is None or (self.tp == 1 and halves == 1):
            return [(stage * self.tp, lead + (0,) * len(body), ((1,) if lead else ()) + body)]
        if body[axis] % (halves * self.tp):
            raise MergeError(f"tensor {key!r}: dimension {axis} ({body[axis]}) does not split into tp={self.tp} "
                             + ("x 2 (gate/up) " if halves == 2 else "") + "equal parts")
        part = body[axis] // (halves * self.tp)
        out = []
        for t in range(self.tp):
            for h in range(halves):
                start = h * (body[axis] // halves) + t * part
                offs = [0] * len(body)
                sizes = list(body)
                offs[axis], sizes[axis] = start, part
                out.append((stage * self.tp + t, lead + tuple(offs), ((1,) if lead else ()) + tuple(sizes)))
        return out

    def owner_of_object(self, key: str) -> int:
        m = _SHARD_SUFFIX.search(key)
        if key.startswith(_LAYERS) and m and "." not in m.group(1):
            return self.stage_of_layer(int(m.group(1))) * self.tp
        return self.stage_of(key) * self.tp


class DcpWriter:
    """Appends items to per-rank ``__<rank>_0.distcp`` files and writes the ``.metadata`` index at the end.

    The item encoding is torch's own (``_write_item``, as Megatron's ``FileSystemWriterAsync`` uses it).
    """

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemWriter

        self.path = path
        self.fs_writer = FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
        self.streams: Dict[int, object] = {}
        self.results: list = []
        self.state_dict_metadata: dict = {}

    def _stream(self, rank: int):
        if rank not in self.streams:
            self.streams[rank] = open(self.path / f"__{rank}_0.distcp", "wb")
        return self.streams[rank]

    def _write(self, rank: int, item, data) -> None:
        import inspect

        from torch.distributed.checkpoint.filesystem import _write_item

        kwargs = {}
        if "serialization_format" in inspect.signature(_write_item).parameters:
            from torch.distributed.checkpoint.filesystem import SerializationFormat

            kwargs["serialization_format"] = SerializationFormat.TORCH_SAVE
        transforms = [self.fs_writer.transforms] if hasattr(self.fs_writer, "transforms") else []
        self.results.append(_write_item(*transforms, self._stream(rank), data, item, f"__{rank}_0.distcp", **kwargs))

    def declare_tensor(self, key: str, properties, size: Tuple[int, ...]) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.state_dict_metadata[key] = TensorStorageMetadata(properties=properties, size=torch.Size(size), chunks=[])

    def write_chunk(self, rank: int, key: str, offsets, data: torch.Tensor) -> None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        md = self.state_dict_metadata[key]
        data = data.contiguous()
        if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes the whole storage
            data = data.clone()
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=data.shape)
        item = WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=chunk, properties=md.properties, size=md.size))
        self._write(rank, item, data)
        md.chunks.append(chunk)

    def write_object(self, rank: int, key: str, data: bytes) -> None:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

        self._write(rank, WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO), io.BytesIO(data))
        self.state_dict_metadata[key] = BytesStorageMetadata()

    def finish(self) -> None:
        from torch.distributed.checkpoint.metadata import Metadata

        for stream in self.streams.values():
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
        self.streams = {}
        self.fs_writer.finish(Metadata(state_dict_metadata=self.state_dict_metadata), [self.results])


def _hf_record(common: dict, ckpt_dir: Path) -> Tuple[dict, Optional[Path]]:
    """The ``hf_to_mcore`` record of a checkpoint or of the one its run started from (checkpoint.load),
    and the checkpoint root its relative tokenizer path refers to. ({}, None) if there is none."""
    seen = set()
    while True:
        if common.get("hf"):
            return dict(common["hf"]), ckpt_dir.parent
        load = ((common.get("config") or {}).get("checkpoint") or {}).get("load")
        if not load:
            return {}, None
        try:
            origin = resolve(load)
        except CheckpointError:
            return {}, None
        if origin is None or origin.resolve() in seen or not (origin / "common.pt").is_file():
            return {}, None
        seen.add(origin.resolve())
        try:
            common = torch.load(origin / "common.pt", map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - only a source of the HF record
            return {}, None
        ckpt_dir = origin


def merge_mcore(paths: Sequence[Path], out: Path, weights: Sequence[float], out_dtype: Optional[torch.dtype],
                tp: Optional[int], pp: Optional[int], force: bool = False,
                log: Callable[[str], None] = lambda m: None) -> Path:
    """Merge Megatron checkpoint dirs ``paths`` into the checkpoint root ``out`` (see the module docstring)."""
    from megatron_kimi.config import ModelConfig, ParallelConfig, validate_model

    inputs = [McoreInput(p, f"input {i + 1} ({p})") for i, p in enumerate(paths)]
    dtypes = check_mcore_inputs(inputs, out_dtype, log)
    first = inputs[0]
    layout = first.common.get("layout") or {}
    tp = int(tp if tp is not None else layout.get("tp", 1))
    pp = int(pp if pp is not None else layout.get("pp", 1))
    if tp < 1 or pp < 1:
        raise MergeError(f"bad output layout tp={tp} pp={pp} (both >= 1)")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = {k: v for k, v in first.config["model"].items() if k in names}
    try:
        validate_model(ModelConfig(**model), ParallelConfig(tensor=tp, pipeline=pp))
    except (TypeError, ValueError) as e:
        raise MergeError(f"cannot write the merged checkpoint at tp={tp} pp={pp}: {e}") from None
    plan = OutputLayout(tp, pp, int(model.get("num_layers", 0)))
    for key in first.tensors:  # every chunk of the output layout exists, before anything is written
        stacked = key.startswith(_LAYERS)
        if stacked and first.shape(key)[0] != plan.num_layers:
            raise MergeError(f"tensor {key!r}: shape {list(first.shape(key))} does not stack "
                             f"model.num_layers={plan.num_layers} layers")
        plan.chunks(key, first.shape(key), 0 if stacked else None)

    _prepare_out(out, [i.ckpt_dir for i in inputs], force, lambda c: c.name in _MCORE_OUT_FILES)
    final = out / iter_dir_name(0)
    tmp = out / (iter_dir_name(0) + ".tmp")
    tmp.mkdir()
    writer = DcpWriter(tmp)
    for key in first.objects:  # e.g. the layers' _extra_state: not weights, the first input's
        writer.write_object(plan.owner_of_object(key), key, first.read_object(key))
    for key in first.tensors:
        shape = first.shape(key)
        props = dataclasses.replace(first.tensors[key].properties, dtype=dtypes[key])
        writer.declare_tensor(key, props, shape)
        layers = range(shape[0]) if key.startswith(_LAYERS) else [None]
        for layer in layers:
            if layer is None:
                offsets, sizes = (0,) * len(shape), shape
            else:
                offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])
            if dtypes[key].is_floating_point:
                unit = _accumulate(inputs, weights, lambda inp: inp.read(key, offsets, sizes), dtypes[key])
            else:
                unit = first.read(key, offsets, sizes)
                for other in inputs[1:]:
                    if not torch.equal(unit, other.read(key, offsets, sizes)):
                        raise MergeError(f"tensor {key!r} is not floating point ({unit.dtype}) and differs between "
                                         f"{first.label} and {other.label}: it cannot be averaged")
            for rank, c_off, c_size in plan.chunks(key, shape, layer):
                local = tuple(o - b for o, b in zip(c_off, offsets))
                writer.write_chunk(rank, key, c_off, _narrow(unit, local, c_size))
            del unit
    writer.finish()

    (tmp / "metadata.json").write_text(json.dumps(_dist_config(first.ckpt_dir)))
    torch.save(_common(inputs, weights, tp, pp, out, log), tmp / "common.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(out, final.name)
    _write_model_yaml(out / "model_config.yaml", model, paths)
    return final


def _dist_config(ckpt_dir: Path) -> dict:
    try:
        saved = json.loads((ckpt_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        saved = {}
    base = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}
    return {**base, **{k: v for k, v in saved.items() if k not in base or k.endswith("_version")}}


def _common(inputs: Sequence[McoreInput], weights: Sequence[float], tp: int, pp: int, out: Path,
            log: Callable[[str], None]) -> dict:
    first = inputs[0]
    config = json.loads(json.dumps(first.config, default=str))  # a deep copy
    par = dict(config.get("parallel") or {})
    par.update(tensor=tp, pipeline=pp, virtual_pipeline=None, context=1)
    if tp == 1:
        par["sequence_parallel"] = False
    config["parallel"] = par
    common = {
        "train_state": dict(_FRESH_TRAIN_STATE),
        "layout": {"tp": tp, "pp": pp, "cp": 1, "dp": 1},
        "format_version": first.common.get("format_version", 1),
        "contents": ["model"],
        "config": config,
        "merged_from": [{"path": str(i.ckpt_dir.resolve()), "weight": w,
                         "step": (i.common.get("train_state") or {}).get("step")} for i, w in zip(inputs, weights)],
    }
    common.update({k: first.common[k] for k in _COMMON_KEPT if k in first.common})
    record, root = _hf_record(first.common, first.ckpt_dir)
    if record:
        tok = record.get("tokenizer_dir")
        src = (root / tok) if (tok and root is not None) else None
        if src is not None and src.is_dir():
            shutil.copytree(src, out / "tokenizer", dirs_exist_ok=True)
            record["tokenizer_dir"] = "tokenizer"
        else:
            record["tokenizer_dir"] = None
        common["hf"] = record
        common.setdefault("hf_architecture", (record.get("architectures") or [None])[0])
    else:
        log("merge: note: the first input records no Hugging Face architecture; mcore-to-hf will need "
            "--model-type")
    return common


def _write_model_yaml(path: Path, model: dict, paths: Sequence[Path]) -> None:
    import yaml

    text = (f"# Model section of the merge of {', '.join(map(str, paths))}; copy it into a megatron_kimi config.\n"
            + yaml.safe_dump({"model": model}, sort_keys=False))
    path.write_text(text)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="merge_checkpoints", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="Megatron checkpoints (run dir, checkpoints/ dir or iter_N dir) or "
                                              "Hugging Face safetensors directories, all of one kind")
    ap.add_argument("--out", required=True, help="output: a checkpoint root (gets latest + iter_0000000/) for "
                                                 "Megatron inputs, an HF directory for HF inputs")
    ap.add_argument("--weights", nargs="+", type=float, default=None,
                    help="one weight per input, summing to 1 (default: equal weights)")
    ap.add_argument("--allow-unnormalized", action="store_true", help="accept weights that do not sum to 1")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="output dtype (default: the inputs', which must then agree)")
    ap.add_argument("--tp", type=int, default=None, help="output tensor-parallel size (default: the first input's)")
    ap.add_argument("--pp", type=int, default=None, help="output pipeline-parallel size (default: the first input's)")
    ap.add_argument("--max-shard-size", default="2GB", help="HF output: largest safetensors file (e.g. 2GB, 500MB)")
    ap.add_argument("--force", action="store_true", help="replace a previous merge in a non-empty --out")
    args = ap.parse_args(argv)
    try:
        path = merge(args.inputs, args.out, args.weights, dtype=args.dtype, tp=args.tp, pp=args.pp,
                     allow_unnormalized=args.allow_unnormalized, max_shard_size=args.max_shard_size,
                     force=args.force)
    except ValueError as e:  # MergeError, CheckpointError, ConversionError, ConfigError
        print(f"merge_checkpoints: error: {e}", file=sys.stderr)
        return 2
    weights = check_weights(args.weights, len(args.inputs), args.allow_unnormalized)
    print(f"merge_checkpoints: wrote {path} ({len(args.inputs)} inputs, weights "
          f"{' '.join(f'{w:g}' for w in weights)})")
    return 0
