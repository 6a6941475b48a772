#!/usr/bin/env python
"""Training throughput for a config and layout: tokens/s, TFLOP/s, MFU, peak memory (one table).

    python tools/bench_train.py examples/tiny/train.yaml --steps 10
    torchrun --nproc-per-node 8 tools/bench_train.py examples/bench/llama_1b.yaml precision.dtype=bf16 --json out.json
"""
import sys

if __name__ == "__main__":
    from megatron_kimi.bench.train import main

    sys.exit(main())
