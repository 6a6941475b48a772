#!/usr/bin/env python
"""Per-GPU memory estimate (params, grads, optimizer shards, activations, logits) and fits-or-not.

    python tools/plan_memory.py examples/long_context/qwen2_7b_128k.yaml --nodes 1
    python tools/plan_memory.py examples/long_context/qwen2_32b_128k.yaml   # assumes 4 nodes (tp8 x cp4)
    python tools/plan_memory.py examples/tiny/train.yaml --world 1 --measure
"""
import sys

if __name__ == "__main__":
    from megatron_kimi.bench.plan_memory import main

    sys.exit(main())
