"""Megatron dist checkpoint -> Hugging Face (Llama / Qwen2 / Kimi-K2.5) safetensors, streaming.

One process, any saved layout. The checkpoint's metadata gives every tensor's global shape; the
tensors are then loaded one unit at a time (the embedding, one decoder layer, the final norm, the
output layer; for a VLM also one tower layer or one other tower / projector tensor) with a sharded
state dict of ``ShardedTensor`` s that cover just that unit (a layer is one slice of the stacked
layer axis), split into HF tensors, and written into safetensors files of at
most ``max_shard_size`` (a file is written, and freed, as soon as its last tensor is ready), plus
``model.safetensors.index.json`` when there is more than one file. Peak memory is about one output
file plus one decoder layer. ``dist_checkpointing.load`` needs a process group: a 1-rank gloo group
on an in-memory store is created (and destroyed) if none exists.

Also written: ``config.json`` (from the checkpoint's model config; the original HF config, when the
checkpoint came from :mod:`hf_to_mcore`, supplies the other fields such as token ids; a checkpoint with
``model.vision`` becomes a Kimi-K2.5 directory with ``text_config`` + ``vision_config``, see
:mod:`megatron_kimi.convert.kimi_k25`), ``generation_config.json`` when one was recorded, and the
tokenizer files (``tokenizer=`` or the recorded ones).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_kimi.config import ModelConfig, TrainConfig, build_config
from megatron_kimi.convert import hf, kimi_k25

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_OUR_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_STACKED = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")  # "<stack>layers.<i>.<key>" (LM or vision tower)
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "vision_model.", "vision_projection.")


def _model_config(common: dict, ckpt_dir: Path) -> ModelConfig:
    model = (common.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise hf.ConversionError(f"{ckpt_dir}: the checkpoint records no model config (common['config']['model'])")
    try:
        data = {"model": model, "training": {"seq_length": 1}}
        return build_config(TrainConfig, data, f"{ckpt_dir} model config").model
    except ValueError as e:
        raise hf.ConversionError(str(e)) from None


def _hf_record(common: dict, ckpt_dir: Path) -> dict:
    """The HF record of hf_to_mcore: in this checkpoint, or in the one its run started from.

    A run started with ``checkpoint.load=<converted checkpoint>`` saves only its own config; the
    architecture, original config.json and tokenizer are then taken from that checkpoint (``_root``:
    the checkpoint root the record's relative paths refer to).
    """
    from megatron_kimi.training import checkpoint

    seen = set()
    while True:
        if common.get("hf"):
            return dict(common["hf"], _root=str(ckpt_dir.parent))
        load = ((common.get("config") or {}).get("checkpoint") or {}).get("load")
        if not load:
            return {}
        try:
            origin = checkpoint.resolve(load)
            if origin is None or origin.resolve() in seen:
                return {}
            seen.add(origin.resolve())
            common, ckpt_dir = checkpoint.read_common(origin), origin
        except ValueError:
            return {}


def _find_tokenizer(tokenizer: Optional[str | Path], ckpt_dir: Path, common: dict, record: dict) -> Optional[Path]:
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_dir():
            raise hf.ConversionError(f"tokenizer directory {path} does not exist")
        return path
    candidates: List[Path] = []
    if record.get("tokenizer_dir"):
        candidates.append(Path(record.get("_root", ckpt_dir.parent)) / record["tokenizer_dir"])
    if record.get("source_dir"):
        candidates.append(Path(record["source_dir"]))
    cfg = common.get("config") or {}
    spec = (cfg.get("data") or {}).get("tokenizer")
    if isinstance(spec, str):
        if spec == "builtin:char" and cfg.get("run_dir"):
            candidates.append(Path(cfg["run_dir"]) / "cache" / "char_tokenizer")
        elif not spec.startswith("builtin:"):
            candidates.append(Path(spec))
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in hf.TOKENIZER_FILES):
            return c
    return None


def _tokenizer_facts(tok_dir: Path) -> dict:
    """Vocabulary size and special token ids of a tokenizer directory ({} if it does not load)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception:  # noqa: BLE001 - only a fallback source of facts
        return {}
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


class _ProcessGroup:
    """A 1-rank gloo group on an in-memory store, unless torch.distributed is already set up."""

    def __enter__(self):
        import torch.distributed as dist

        self.created = False
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise hf.ConversionError("mcore_to_hf runs in a single process (torch.distributed has "
                                         f"world size {dist.get_world_size()})")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self.created = True
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        return False


def _split_stacked(name: str):
    """"vision_model.decoder.layers.3.x" -> ("vision_model.decoder.layers.x", 3); else (name, None)."""
    m = _STACKED.match(name)
    return (m.group(1) + m.group(3), int(m.group(2))) if m else (name, None)


def _check_metadata(metadata: dict, arch, ckpt_dir: Path) -> None:
    expected = kimi_k25.mapping(arch).megatron_shapes(arch)
    for key, (shape, stacked) in expected.items():
        full = ((kimi_k25.stack_depth(key, arch),) + tuple(shape)) if stacked else tuple(shape)
        if key not in metadata:
            raise hf.ConversionError(f"missing tensor {key!r} in checkpoint {ckpt_dir}")
        got = tuple(metadata[key].global_shape)
        if got != full:
            raise hf.ConversionError(f"tensor {key!r} in checkpoint {ckpt_dir}: shape {list(got)} does not match "
                                     f"the model config (expected {list(full)})")
    for key in metadata:
        if key.startswith(_MODEL_PREFIXES) and key not in expected \
                and not key.endswith("_extra_state"):
            raise hf.ConversionError(f"unexpected tensor {key!r} in checkpoint {ckpt_dir} (no HF counterpart "
                                     "for this model config)")


def _units(arch) -> List[List[str]]:
    """The names grouped into load units: one per decoder layer (LM or tower), one per other tensor."""
    names = kimi_k25.mapping(arch).megatron_names(arch)
    units: List[List[str]] = []
    current = None
    for name in names:
        key, layer = _split_stacked(name)
        unit = None if layer is None else (key.rsplit("layers.", 1)[0], layer)
        if unit is not None and unit == current:
            units[-1].append(name)
        else:
            units.append([name])
        current = unit
    return units


def _load_unit(names: List[str], metadata: dict, arch, ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = {}
    for j, name in enumerate(names):
        ckey, layer = _split_stacked(name)
        meta = metadata[ckey]
        if layer is None:
            sd[f"__convert_{j}"] = ShardedTensor.from_rank_offsets(
                name, torch.empty(tuple(meta.global_shape), dtype=meta.dtype), replica_id=0)
        else:
            shape = (1,) + tuple(meta.global_shape[1:])
            sd[f"__convert_{j}"] = ShardedTensor.from_rank_offsets(
                ckey, torch.empty(shape, dtype=meta.dtype), (0, layer, kimi_k25.stack_depth(ckey, arch)),
                replica_id=0)
    loaded = dist_checkpointing.load(sd, str(ckpt_dir), validate_access_integrity=False)
    out = {}
    for j, name in enumerate(names):
        t = loaded[f"__convert_{j}"]
        out[name] = t[0] if _split_stacked(name)[1] is not None else t
    return out


def mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    model_type: Optional[str] = None,
    tokenizer: Optional[str | Path] = None,
    max_shard_size: str | int = "2GB",
    dtype: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> Path:
    """Write the HF checkpoint of Megatron checkpoint ``ckpt`` (a checkpoints/ root or an iter dir) to ``out``."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from megatron_kimi.training import checkpoint

    ckpt_dir = checkpoint.resolve(ckpt)
    if ckpt_dir is None:
        raise hf.ConversionError(f"{ckpt}: no checkpoint there (expected an iter_* directory or a `latest` file)")
    common = checkpoint.read_common(ckpt_dir)
    m = _model_config(common, ckpt_dir)
    record = _hf_record(common, ckpt_dir)
    vlm = m.vision is not None  # written as Kimi-K2.5; model_type then names its text model
    model_type = model_type or record.get("text_model_type" if vlm else "model_type")
    if model_type is None:
        raise hf.ConversionError(f"{ckpt_dir}: the checkpoint does not record an HF architecture; pass "
                                 f"model_type (--model-type {'|'.join(hf.SUPPORTED_ARCHITECTURES)}"
                                 f"{': the text model of the Kimi-K2.5 output' if vlm else ''})")
    if model_type not in hf.SUPPORTED_ARCHITECTURES:
        raise hf.ConversionError(f"model_type={model_type!r} is not supported (supported: "
                                 f"{', '.join(hf.SUPPORTED_ARCHITECTURES)})")
    if dtype is not None and dtype not in _DTYPES:
        raise hf.ConversionError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    max_bytes = hf.parse_size(max_shard_size)

    with _ProcessGroup():
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        if hf.EMBEDDING not in metadata:
            raise hf.ConversionError(f"missing tensor {hf.EMBEDDING!r} in checkpoint {ckpt_dir}")
        padded = metadata[hf.EMBEDDING].global_shape[0]
        tok_dir = _find_tokenizer(tokenizer, ckpt_dir, common, record)
        base = record.get("config")
        tok = _tokenizer_facts(tok_dir) if tok_dir is not None and (base is None or not m.vocab_size) else {}
        # model.vocab_size None: the run used its tokenizer's size (padded in the checkpoint)
        vocab = (vocab_size or m.vocab_size or kimi_k25.text_config_of(base).get("vocab_size") or tok.get("vocab_size")
                 or padded)
        arch = kimi_k25.arch_from_model_config(m, padded, vocab)
        _check_metadata(metadata, arch, ckpt_dir)
        source = record.get("source_dtype") or []  # the HF checkpoint's dtype, if it came from one
        if dtype:
            out_dtype = _DTYPES[dtype]
        elif len(source) == 1 and source[0] in _SAFETENSORS_DTYPES:
            out_dtype = _SAFETENSORS_DTYPES[source[0]]
        else:
            out_dtype = metadata[hf.EMBEDDING].dtype
        if base is None:  # trained from scratch: token ids from the tokenizer
            base = {k: v for k, v in tok.items() if k.endswith("_token_id") and v is not None}
        hf_config = (kimi_k25 if vlm else hf).hf_config_from_model_config(m, model_type, vocab, out_dtype, base=base)
        names_of = kimi_k25.mapping(arch)
        shapes = list(names_of.hf_shapes(arch).items())
        files = hf.plan_shards(shapes, out_dtype, max_bytes)
        names = (["model.safetensors"] if len(files) == 1
                 else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
        file_of = {t: names[i] for i, group in enumerate(files) for t in group}
        remaining = {names[i]: len(group) for i, group in enumerate(files)}

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():  # stale shards of an earlier export would confuse loaders
            if _OUR_FILES.match(old.name) or old.name == "model.safetensors.index.json":
                old.unlink()

        buffers: Dict[str, Dict[str, torch.Tensor]] = {}
        total = 0
        for unit in _units(arch):
            for name, tensor in _load_unit(unit, metadata, arch, ckpt_dir).items():
                for hf_name, t in names_of.hf_from_megatron(name, tensor, arch).items():
                    fname = file_of[hf_name]
                    buffers.setdefault(fname, {})[hf_name] = t.to(out_dtype).contiguous()
                    total += t.numel() * hf.dtype_nbytes(out_dtype)
                    remaining[fname] -= 1
                    if remaining[fname] == 0:
                        save_file(buffers.pop(fname), str(out / fname), metadata={"format": "pt"})
        if buffers or any(remaining.values()):
            raise hf.ConversionError(f"internal error: tensors left unwritten: {sorted(remaining)}")

    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if record.get("generation_config"):
        (out / "generation_config.json").write_text(json.dumps(record["generation_config"], indent=2) + "\n")
    if tok_dir is not None:
        for f in hf.TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, out / f)
    return out
