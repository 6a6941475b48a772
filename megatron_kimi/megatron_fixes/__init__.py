"""Every workaround for a Megatron-Core bug or limitation lives in this package.

Each module names the upstream version it was written against and has a test under
``tests/megatron_fixes/`` that fails if upstream changes under it (so the fix can be dropped).
"""
