"""Checkpoint conversion between Hugging Face (Llama / Qwen2 / Kimi-K2.5) and Megatron dist checkpoints.

* ``megatron_kimi.convert.hf_to_mcore.hf_to_mcore``: HF safetensors -> Megatron checkpoint
  at a TP/PP layout (``tp * pp`` local CPU ranks, each reading only its shard).
* ``megatron_kimi.convert.mcore_to_hf.mcore_to_hf``: Megatron checkpoint (any layout) ->
  HF safetensors, streamed tensor by tensor in one process.
* :mod:`megatron_kimi.convert.hf`: the name / layout / config mapping as pure functions.
* :mod:`megatron_kimi.convert.kimi_k25`: the same for Kimi-K2.5 (``model_type: kimi_k25``: vision tower
  + projector + a Llama / Qwen2 text model) <-> a VLM (``model.vision``), on top of ``hf`` and
  :mod:`megatron_kimi.convert.vision` (tower and projector names / layouts / ``vision_config``).

=========================  ================================  =========================================
HF ``model_type``          Megatron checkpoint               HF tensor names
=========================  ================================  =========================================
llama / qwen2              LM (``embedding``, ``decoder``,   ``model.*``, ``lm_head.weight``
                           ``output_layer``)
kimi_k25 (text_config      LM + ``vision_model.*``,          ``model.language_model.*``,
llama / qwen2)             ``vision_projection.*``           ``model.vision_tower.*``,
                           (first pipeline stage)            ``model.mm_projector.*``, ``lm_head.weight``
=========================  ================================  =========================================

``mcore-to-hf`` writes Kimi-K2.5 for a checkpoint whose ``model.vision`` is set (``--model-type``
then names its text model), else Llama / Qwen2.

CLI: ``python tools/convert_checkpoint.py {hf-to-mcore,mcore-to-hf} ...`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_kimi.convert.hf import ConversionError

__all__ = ["ConversionError", "main", "build_parser"]

# The entry points live in the submodules of the same name (import them from there):
#   from megatron_kimi.convert.hf_to_mcore import hf_to_mcore
#   from megatron_kimi.convert.mcore_to_hf import mcore_to_hf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py",
                                     description="Convert checkpoints between Hugging Face and Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors (Llama / Qwen2 / Kimi-K2.5) -> Megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint root (gets latest + iter_0000000/)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padding (model.make_vocab_size_divisible_by)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing conversion in --out")
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="a checkpoints/ dir with `latest`, or an iter_* dir")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--model-type", choices=["llama", "qwen2"], default=None,
                   help="HF architecture (default: the one recorded at hf-to-mcore time); for a VLM "
                        "checkpoint (model.vision) the text model of the Kimi-K2.5 output")
    b.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the recorded one)")
    b.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (e.g. 2GB, 500MB)")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="output dtype (default: the original HF checkpoint's, else the Megatron checkpoint's)")
    b.add_argument("--vocab-size", type=int, default=None,
                   help="unpadded vocabulary (default: model.vocab_size of the checkpoint)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

            path = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                               make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                               overwrite=args.overwrite)
            print(f"hf-to-mcore: wrote {path} (tp={args.tp}, pp={args.pp}); model section in "
                  f"{path.parent / 'model_config.yaml'}", flush=True)
        else:
            from megatron_kimi.convert.mcore_to_hf import mcore_to_hf

            path = mcore_to_hf(args.ckpt, args.out, model_type=args.model_type, tokenizer=args.tokenizer,
                               max_shard_size=args.max_shard_size, dtype=args.dtype, vocab_size=args.vocab_size)
            print(f"mcore-to-hf: wrote {path}", flush=True)
    except ValueError as e:  # ConversionError, CheckpointError, ConfigError
        print(f"convert_checkpoint {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
