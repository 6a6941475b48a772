#!/usr/bin/env python
"""Merge checkpoints into their weighted average (Kimi k1.5 long2short model merging).

    python tools/merge_checkpoints.py runs/long-cot runs/short-cot --weights 0.5 0.5 --out out/merged
    python tools/merge_checkpoints.py HF_LONG HF_SHORT --out HF_MERGED --dtype bf16

See megatron_kimi/ckpt_tools/merge.py.
"""
import sys

from megatron_kimi.cli import quiet_warnings

if __name__ == "__main__":
    quiet_warnings()
    from megatron_kimi.ckpt_tools.merge import main

    sys.exit(main())
