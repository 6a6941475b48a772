"""Model code: the LM (Megatron-Core GPTModel), attention, norms, init, FLOPs and memory models."""
