"""Convert checkpoints between Hugging Face (Llama / Qwen2 / Kimi-K2.5) and Megatron-Core dist checkpoints.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF_DIR --out CKPT_DIR [--tp N] [--pp N]
    python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--model-type llama|qwen2]
        [--tokenizer DIR] [--max-shard-size 2GB] [--dtype fp32|bf16|fp16]

A Kimi-K2.5 directory (model_type kimi_k25, Llama / Qwen2 text model) becomes a VLM checkpoint
(model.vision) and back; --model-type then names the text model. See megatron_kimi/convert/.

The ``__main__`` guard is required: the conversion ranks and dist_checkpointing's helpers are
spawned processes that re-import this file.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_kimi.convert import main

    sys.exit(main())
