"""Read given blocks of a dist checkpoint's stored (global) tensors with torch DCP, in this process alone.

megatron's loader reads the shards a model's sharded state dict asks for; these helpers read any block
(one layer of a layer-stacked `[L, ...]` tensor, the rows of some heads) into fresh buffers, without a
process group (`no_dist=True`). Used by the streaming export (`mcore_io.GroupReader`) and by the ViT
head re-padding at load (`vit_padding`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint.atomic import short_error
from engine.checkpoint.hf_io import CheckpointError

try:  # torch DCP wraps a reader's failure (missing file, bad bytes) in CheckpointException
    from torch.distributed.checkpoint.api import CheckpointException as DCPError
except ImportError:  # pragma: no cover
    DCPError = RuntimeError
LOAD_ERRORS = (Exception, DCPError)


def stored_tensors(ckpt_dir: str | Path) -> dict:
    """Stored key -> torch DCP TensorStorageMetadata (`.size`, `.properties.dtype`) of a dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir}/.metadata is unreadable ({e}); the checkpoint is corrupted") from None


class SlicePlanner:
    """torch DCP load planner that reads given sub-blocks (a layer of a layer-stacked tensor) into buffers.

    The class is made once: a class made per call is a reference cycle, and its methods' closure kept
    that call's buffers alive until Python's cyclic GC ran (seen: +190 MiB in mcore-to-hf's peak).
    """

    _cls = None

    @classmethod
    def make(cls, slices: dict):
        if cls._cls is None:
            from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
            from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
            from torch.distributed.checkpoint.planner import LoadPlan
            from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

            class Planner(DefaultLoadPlanner):
                def __init__(self, slices: dict):
                    super().__init__()
                    self.slices = slices  # stored key -> (offsets, buffer)

                def create_local_plan(self):
                    items = []
                    for key, (offsets, buf) in self.slices.items():
                        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
                        items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
                    return LoadPlan(items)

                def lookup_tensor(self, index):  # the buffer holds just the requested block
                    return self.slices[index.fqn][1]

            cls._cls = Planner
        return cls._cls(slices)


def read_slices(ckpt_dir: str | Path, slices: dict[str, tuple[tuple[int, ...], torch.Tensor]], what: str) -> None:
    """Fill each buffer with the block of stored tensor `key` that starts at `offsets` (same rank as the
    tensor; the block has the buffer's shape). At most one block per key per call."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    if not slices:
        return
    try:
        dcp_load({k: b for k, (_, b) in slices.items()}, storage_reader=FileSystemReader(str(ckpt_dir)),
                 planner=SlicePlanner.make(slices), no_dist=True)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{ckpt_dir}: reading {what} failed ({short_error(e)}); a shard file is missing or "
                              "corrupted") from e


__all__ = ["DCPError", "LOAD_ERRORS", "SlicePlanner", "read_slices", "short_error", "stored_tensors"]
