"""Hugging Face (Llama / Qwen2 / Kimi-K2.5 safetensors) -> Megatron dist checkpoint at a given TP/PP layout.

The parent process reads only ``config.json`` and the safetensors *headers* and checks every tensor
name and shape (missing / unexpected / mis-shaped tensors fail here, before anything is spawned).
Then ``tp * pp`` local gloo ranks (CPU, CUDA hidden) each build their own Megatron model shard at that
layout, fill every local parameter shard by reading from the safetensors files only the rows and
columns it holds (``safe_open(...).get_slice(name)[rows, cols]``), and write the checkpoint together
with :func:`megatron_kimi.training.checkpoint.save`. Peak memory per rank is about its own shard.

Kimi-K2.5 (``config.json`` ``model_type: kimi_k25``, a Llama / Qwen2 ``text_config``): the model config
gets ``vision`` (:func:`megatron_kimi.convert.kimi_k25.model_config_from_hf`), the first pipeline stage's
ranks also fill ``vision_model.*`` / ``vision_projection.*`` (TP-sharded linears sliced as the LM's are),
and the checkpoint records the text model type for ``mcore_to_hf``.

Output (``OUT``)::

    OUT/latest, OUT/iter_0000000/    # a checkpoint.save directory; common contents == ["model"]
    OUT/model_config.yaml            # the ``model:`` section to put into a megatron_kimi config
    OUT/tokenizer/                   # the tokenizer files of the HF directory, if it had any
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import struct
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from megatron_kimi.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from megatron_kimi.convert import hf, kimi_k25
from megatron_kimi.platform.launch import environ, free_port

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


# --------------------------------------------------------------------------------------------
# Reading the HF directory (config + safetensors headers only)
# --------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise hf.ConversionError(f"{path}: no config.json in the Hugging Face directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise hf.ConversionError(f"{path}: invalid JSON ({e})") from None


def read_safetensors_header(path: Path) -> Dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} from a safetensors file's header (no data read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise hf.ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def scan_hf_tensors(hf_dir: str | Path) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...], str]], str]:
    """{tensor name: (absolute file, shape, dtype)} and a description of where they were listed."""
    hf_dir = Path(hf_dir).resolve()
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise hf.ConversionError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        where = str(index)
    elif (hf_dir / SINGLE_FILE).is_file():
        files, weight_map, where = [SINGLE_FILE], None, str(hf_dir / SINGLE_FILE)
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            raise hf.ConversionError(f"{hf_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files "
                                     "(only safetensors checkpoints are supported)")
        weight_map, where = None, f"{hf_dir}/*.safetensors"
    tensors: Dict[str, Tuple[str, Tuple[int, ...], str]] = {}
    headers = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise hf.ConversionError(f"{index}: lists {name}, which does not exist in {hf_dir}")
        headers[name] = read_safetensors_header(path)
    if weight_map is not None:
        for tensor, fname in weight_map.items():
            if tensor not in headers[fname]:
                raise hf.ConversionError(f"tensor {tensor!r}: listed in {index} for {fname}, but missing "
                                         f"from {hf_dir / fname}")
            info = headers[fname][tensor]
            tensors[tensor] = (str(hf_dir / fname), tuple(info["shape"]), info["dtype"])
    unlisted: Dict[str, str] = {}
    for fname, header in headers.items():
        for tensor, info in header.items():
            if weight_map is not None:
                if tensor not in weight_map:  # loaders go by the index: such a tensor is not there
                    unlisted[tensor] = str(hf_dir / fname)
                continue
            if tensor in tensors:
                raise hf.ConversionError(f"tensor {tensor!r}: in both {tensors[tensor][0]} and {hf_dir / fname}")
            tensors[tensor] = (str(hf_dir / fname), tuple(info["shape"]), info["dtype"])
    if unlisted:
        where += " (" + ", ".join(f"{t!r} is in {Path(f).name} but not listed in the index"
                                  for t, f in sorted(unlisted.items())[:5]) + ")"
    return tensors, where


def check_hf_tensors(tensors: Dict[str, Tuple[str, Tuple[int, ...], str]], arch, where: str) -> Dict[str, str]:
    """Every expected tensor present with its shape, nothing unexpected; returns {name: file}.

    ``arch``: an ``hf.Arch``, or a ``kimi_k25.VLMArch`` (Kimi-K2.5 names).
    """
    names = kimi_k25.mapping(arch)
    expected = names.hf_shapes(arch)
    for name, shape in expected.items():
        if name not in tensors:
            raise hf.ConversionError(f"missing tensor {name!r} (expected shape {list(shape)}) in {where}")
        path, actual, dtype = tensors[name]
        if tuple(actual) != tuple(shape):
            raise hf.ConversionError(f"tensor {name!r} in {path}: shape {list(actual)} does not match the "
                                     f"config (expected {list(shape)})")
        if dtype not in _FLOAT_DTYPES:
            raise hf.ConversionError(f"tensor {name!r} in {path}: dtype {dtype} is not a float type")
    for name, (path, _, _) in tensors.items():
        if name not in expected and not names.is_ignorable_hf_tensor(name, arch):
            raise hf.ConversionError(f"unexpected tensor {name!r} in {path} (not part of a "
                                     f"{'tied' if arch.tied else 'untied'} model with this config)")
    return {name: tensors[name][0] for name in expected}


def _tokenizer_files(hf_dir: Path):
    return [hf_dir / f for f in hf.TOKENIZER_FILES if (hf_dir / f).is_file()]


# --------------------------------------------------------------------------------------------
# Rank body
# --------------------------------------------------------------------------------------------


def _fill_shard(sh, arch, weight_map: Dict[str, str], read) -> None:
    """Copy the HF rows/columns of Megatron shard ``sh`` into it (zeros for vocab padding)."""
    segs = kimi_k25.mapping(arch).megatron_segments(sh.name, arch)
    total = sum(s.rows for s in segs)
    if total != sh.full_shape[0]:
        raise hf.ConversionError(f"Megatron tensor {sh.name!r}: {sh.full_shape[0]} rows, the HF mapping gives {total}")
    rows = sh.index[0]
    cols = tuple(sh.index[1:])
    a, b = rows.start, rows.stop
    g0 = 0
    for seg in segs:
        g1 = g0 + seg.rows
        lo, hi = max(a, g0), min(b, g1)
        if lo < hi:
            dst = sh.tensor[lo - a:hi - a]
            if seg.hf_name is None:
                dst.zero_()
            else:
                path = weight_map[seg.hf_name]
                src = read(path, seg.hf_name, (slice(seg.start + lo - g0, seg.start + hi - g0),) + cols)
                if tuple(src.shape) != tuple(dst.shape):
                    raise hf.ConversionError(f"tensor {seg.hf_name!r} in {path}: read {list(src.shape)} for "
                                             f"Megatron {sh.name!r}, expected {list(dst.shape)}")
                dst.copy_(src)
        g0 = g1


def _train_config(m: ModelConfig, tp: int, pp: int) -> TrainConfig:
    from megatron_kimi.config import TrainingConfig

    return TrainConfig(
        run_dir="<convert>",
        model=m,
        parallel=ParallelConfig(tensor=tp, pipeline=pp),
        training=TrainingConfig(steps=0, global_batch_size=1, micro_batch_size=1, seq_length=1),
    )


def convert_rank(plan: dict) -> None:
    """Build this rank's model shard, fill it from safetensors, save (all ranks together).

    Needs torch.distributed and Megatron's parallel state initialised at the plan's layout.
    """
    import contextlib

    import torch
    from safetensors import safe_open

    from megatron_kimi.model.builder import build_model_chunks, transformer_config
    from megatron_kimi.model.sharding import local_shards
    from megatron_kimi.training import checkpoint

    cfg: TrainConfig = plan["train_config"]
    build_model = replace(cfg.model, transformer_impl="local")
    tf_config = transformer_config(build_model, cfg.parallel, cfg.precision)
    # Every weight is overwritten below; skip Megatron's (full-tensor, on CPU) random init.
    tf_config.perform_initialization = False
    arch = plan["arch"]  # hf.Arch, or kimi_k25.VLMArch
    chunks = build_model_chunks(build_model, tf_config, arch.padded_vocab_size)
    params = [(n, p) for c in chunks for n, p in c.named_parameters()]
    with torch.no_grad():
        for _, p in params:
            p.fill_(float("nan"))
        with contextlib.ExitStack() as stack:
            handles = {}

            def read(path, name, index):
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                return handles[path].get_slice(name)[index]

            for sh in local_shards(chunks):
                _fill_shard(sh, arch, plan["weight_map"], read)
        for name, p in params:
            flat = p.detach().view(-1)
            if any(torch.isnan(flat[i:i + (1 << 24)]).any() for i in range(0, flat.numel(), 1 << 24)):
                raise hf.ConversionError(f"Megatron parameter {name!r} was not (fully) filled from the HF "
                                         "checkpoint (or the source holds NaNs)")
    checkpoint.save(plan["out"], 0, chunks, None, None, plan["train_state"], extra=plan["extra"])


def _worker(plan: dict) -> None:
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()  # before Megatron is imported
    from megatron_kimi.training.runtime import initialize, shutdown

    initialize(plan["train_config"])
    try:
        convert_rank(plan)
    finally:
        shutdown()


# --------------------------------------------------------------------------------------------
# Local multi-process launch
# --------------------------------------------------------------------------------------------


def _child(rank: int, fn, args, results) -> None:
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        fn(*args)
        results.put((rank, "ok", None, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        kind = "conversion" if isinstance(e, hf.ConversionError) else "error"
        results.put((rank, kind, str(e), traceback.format_exc()))
    results.close()
    results.join_thread()


def launch_local(fn, world_size: int, *args, timeout: Optional[float] = None) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned CPU ranks (torchrun-style env, CUDA hidden)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    shared = dict(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    for rank in range(world_size):
        with environ(dict(shared, RANK=str(rank), LOCAL_RANK=str(rank))):
            p = ctx.Process(target=_child, args=(rank, fn, args, results), name=f"convert-rank{rank}")
            p.start()  # the child inherits the environment set here
        procs.append(p)
    done, failure = set(), None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(done) < world_size and failure is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"conversion ranks did not finish within {timeout} s")
            try:
                rank, status, msg, tb = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode is not None and p.exitcode != 0:
                        time.sleep(1.0)  # its report may still be in flight
                        if results.empty():
                            failure = (r, "error", f"process exited with code {p.exitcode}", "")
                continue
            if status == "ok":
                done.add(rank)
            else:
                failure = (rank, status, msg, tb)
    finally:
        grace = time.monotonic() + (5.0 if failure is None else 2.0)
        for p in procs:
            p.join(max(0.0, grace - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    if failure is not None:
        rank, status, msg, tb = failure
        if status == "conversion":
            raise hf.ConversionError(msg)
        raise RuntimeError(f"conversion rank {rank} failed: {msg}\n{tb}")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def prepare(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> dict:
    """Check the HF directory (config + safetensors headers) and plan the conversion.

    Returns the (picklable) plan that every rank passes to :func:`convert_rank`.
    """
    from megatron_kimi.config import validate_model

    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    if tp < 1 or pp < 1:
        raise hf.ConversionError(f"tp={tp}, pp={pp}: both must be >= 1")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise hf.ConversionError(f"{out}: output directory is not empty (pass overwrite=True / --overwrite)")
    hf_config = read_hf_config(hf_dir)
    vlm = kimi_k25.is_kimi_k25(hf_config)
    try:
        m = (kimi_k25 if vlm else hf).model_config_from_hf(hf_config, make_vocab_size_divisible_by)
    except hf.ConversionError as e:
        raise hf.ConversionError(f"{hf_dir / 'config.json'}: {e}") from None
    try:
        validate_model(m, ParallelConfig(tensor=tp, pipeline=pp))
    except ValueError as e:
        raise hf.ConversionError(f"{hf_dir}: cannot convert at tp={tp}, pp={pp}: {e}") from None
    tensors, where = scan_hf_tensors(hf_dir)
    if vlm:
        kimi_k25.check_tensor_layout(tensors, where)
    from megatron_kimi.model.builder import padded_vocab_size  # imports Megatron

    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    arch = kimi_k25.arch_from_model_config(m, padded)
    weight_map = check_hf_tensors(tensors, arch, where)

    if out.exists():
        for child in ("latest", "iter_0000000", "model_config.yaml", "tokenizer"):
            target = out / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)

    tok_files = [str(f) for f in _tokenizer_files(hf_dir)]
    gen_path = hf_dir / "generation_config.json"
    record = {
        "model_type": hf_config["model_type"],
        "architectures": hf_config.get("architectures")
        or [kimi_k25.ARCHITECTURE if vlm else hf.SUPPORTED_ARCHITECTURES[hf_config["model_type"]]],
        "config": hf_config,
        "source_dir": str(hf_dir),
        "tokenizer_dir": "tokenizer" if tok_files else None,
        "generation_config": json.loads(gen_path.read_text()) if gen_path.is_file() else None,
        "source_dtype": sorted({dt for _, _, dt in tensors.values()}),
    }
    if vlm:  # mcore_to_hf writes the text_config of this text architecture
        record["text_model_type"] = kimi_k25.text_model_type(hf_config)
    train_config = _train_config(m, tp, pp)
    return {
        "hf_dir": str(hf_dir),
        "train_config": train_config,
        "arch": arch,
        "weight_map": weight_map,
        "out": str(out),
        "tokenizer_files": tok_files,
        "train_state": {"step": 0, "consumed_samples": 0, "consumed_tokens": 0, "stage": 0},
        "extra": {"config": to_dict(train_config), "hf": record, "hf_architecture": record["architectures"][0],
                  "converted_from": "hf"},
    }


def finish(plan: dict) -> Path:
    """After the ranks saved: tokenizer files and model_config.yaml. Returns the checkpoint dir."""
    out = Path(plan["out"])
    if plan["tokenizer_files"]:
        (out / "tokenizer").mkdir(exist_ok=True)
        for f in plan["tokenizer_files"]:
            shutil.copy2(f, out / "tokenizer" / Path(f).name)
    _write_model_yaml(out / "model_config.yaml", plan["train_config"].model, Path(plan["hf_dir"]),
                      plan["extra"]["hf"]["model_type"])
    return out / "iter_0000000"


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
    timeout: Optional[float] = None,
) -> Path:
    """Convert the HF checkpoint in ``hf_dir`` into a Megatron checkpoint root ``out`` at TP x PP.

    Returns the checkpoint directory (``out/iter_0000000``). Raises ``ConversionError`` (a
    ValueError) naming the field / tensor / file for unsupported or inconsistent inputs.
    """
    plan = prepare(hf_dir, out, tp, pp, make_vocab_size_divisible_by, overwrite)
    launch_local(_worker, tp * pp, plan, timeout=timeout)
    return finish(plan)


def _write_model_yaml(path: Path, m: ModelConfig, hf_dir: Path, model_type: str) -> None:
    import yaml

    text = (f"# Model section converted from {hf_dir} ({model_type}); copy it into a megatron_kimi config.\n"
            + yaml.safe_dump({"model": to_dict(m)}, sort_keys=False))
    path.write_text(text)

