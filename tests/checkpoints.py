"""Reading checkpoints in tests, independent of the code under test."""

from __future__ import annotations

from pathlib import Path

import torch


def global_tensors(ckpt: Path) -> dict:
    """Every tensor of a torch_dist checkpoint (model and optimizer state) at its global shape; single
    process, no process group."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(ckpt)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return sd
