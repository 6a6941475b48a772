"""CLI commands: each module has ``run(cfg) -> int``; the registry is in megatron_kimi.cli."""
