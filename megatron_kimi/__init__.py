"""megatron_kimi: the Kimi k1.5 recipe (SFT, long context, mirror-descent RL) on Megatron-Core."""

__version__ = "0.1.0"
