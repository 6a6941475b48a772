#!/usr/bin/env python
"""Reshard a megatron_kimi checkpoint offline to another TP/PP layout.

    python tools/reshard_checkpoint.py runs/tiny-train/checkpoints out/ckpt-tp2pp2 --tp 2 --pp 2
"""
import sys

from megatron_kimi.cli import quiet_warnings

if __name__ == "__main__":
    quiet_warnings()
    from megatron_kimi.ckpt_tools.reshard import main

    sys.exit(main())
