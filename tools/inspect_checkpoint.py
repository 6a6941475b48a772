#!/usr/bin/env python
"""Inspect a megatron_kimi checkpoint: layout, step, config, tensors; fails clearly if incomplete.

    python tools/inspect_checkpoint.py runs/tiny-sft [--tensors] [--json]
"""
import sys

from megatron_kimi.cli import quiet_warnings

if __name__ == "__main__":
    quiet_warnings()
    from megatron_kimi.ckpt_tools.inspect import main

    sys.exit(main())
