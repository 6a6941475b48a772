import sys

from megatron_kimi.cli import main

if __name__ == "__main__":  # guard: dist_checkpointing's spawned helpers re-import __main__
    sys.exit(main())
