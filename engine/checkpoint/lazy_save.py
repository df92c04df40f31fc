"""Write a megatron dist checkpoint (torch_dist) one tensor piece at a time, without the model's tensors.

megatron's `dist_checkpointing.save` takes the model's tensors, and its writer (`FileSystemWriterAsync`)
stages all of them before writing, so a conversion through it holds the whole model (per rank: its
TP x PP shard). Here nothing is held:

  layout   A model built on the meta device (TP=1, PP=1) gives megatron's sharded state dict: every
           stored key, its global shape and dtype, and where each of our full tensors sits in it (one
           layer of a layer-stacked [L, ...] tensor, one half of SwiGLU's fc1 = [gate; up]). Each such
           block becomes one or more `Piece`s: row ranges of one of our tensors, at most
           `max_piece_bytes` each where the source can be read by rows (`sliceable`).
  save     torch DCP with a planner whose `resolve_data` produces a piece only when the writer asks for
           it, and a writer that writes that piece, drops it and asks for the next. Pieces are spread
           over however many processes run the save (each writes `__<rank>_0.distcp`).
  megatron `common.pt` (the state dict's non-tensor part; empty for our models) and `metadata.json`
           (backend torch_dist), as `dist_checkpointing.save` writes them.

What megatron's `dist_checkpointing.load` reads is the same as from its own save: the global tensors
under megatron's keys at any TP/PP. Only the chunking inside the files differs, which the loader reads
through torch DCP's chunk metadata like any other.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.futures import Future

from engine.checkpoint.hf_io import CheckpointError

# Pieces of a sliceable tensor are at most this big. A 38B layer (Qwen2.5-32B, bf16) is ~1 GB and its
# biggest tensors (fc1's gate / up halves, fc2) 283 MB each; 64 MiB keeps every read below the fused
# q/k/v (~150 MB with its inputs), for ~1,000 more entries in .metadata.
MAX_PIECE_BYTES = 64 << 20

_LAYER = re.compile(r"^(\w+)\.(?:decoder\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of our full tensor `name`, stored at `offsets` in megatron's tensor `key`."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    name: str
    rows: tuple[int, int]
    zeros: bool = False  # vocab padding rows: no source, all zero

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize

    @property
    def group(self) -> str:
        """The tensor group it belongs to: one layer of a part, or a non-layer tensor on its own."""
        m = _LAYER.match(self.name)
        return f"{m.group(1)}.layer{m.group(2)}" if m else self.name


@dataclass
class Layout:
    pieces: list[Piece]
    objects: dict[str, object]  # ShardedObject unique key -> data (megatron's `_extra_state`: None)
    common: dict  # the non-sharded rest of the state dict -> common.pt
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # our name -> full (unpadded) shape

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def group_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pieces:
            out[p.group] = out.get(p.group, 0) + p.nbytes
        return out


def _row_blocks(start: int, stop: int, row_bytes: int, max_bytes: int) -> list[tuple[int, int]]:
    step = max(1, max_bytes // max(row_bytes, 1))
    return [(r, min(r + step, stop)) for r in range(start, stop, step)] or [(start, stop)]


def build_layout(sharded_state_dict: dict, *, vocab_rows: dict[str, tuple[int, int]],
                 sliceable: Callable[[str], bool], max_piece_bytes: int = MAX_PIECE_BYTES) -> Layout:
    """Pieces of a TP=1/PP=1 (meta) model's sharded state dict. Consumes the dict (megatron applies factories).

    vocab_rows: our name -> (real rows, rows to store): the vocab tensors are stored padded for the TP the
    checkpoint is written for (the padding rows are zeros). sliceable(name): its rows can be read alone.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=False)
    meta = [k for k, v in common.items() if any(isinstance(t, torch.Tensor) and t.is_meta for t in nested_values({k: v}))]
    if meta:  # common.pt holds values, which a meta-device model does not have
        raise CheckpointError(f"the model's non-sharded state {meta[:3]} holds tensors; this writer cannot produce them")
    pieces, objects, shapes, seen = [], {}, {}, set()
    for name, value in sharded.items():
        for sh in nested_values({name: value}):
            # Every process builds the same TP=1/PP=1 model; replica ids differ only by its DP rank, so the
            # first entry for a stored block is the one to write, whichever process this is.
            if isinstance(sh, ShardedObject):
                objects.setdefault(sh.unique_key, sh.data)
                continue
            if not isinstance(sh, ShardedTensor):
                raise CheckpointError(f"'{name}': a {type(sh).__name__} in the sharded state dict; only tensors and "
                                      "objects can be written")
            if (sh.key, tuple(sh.global_offset)) in seen:
                continue
            seen.add((sh.key, tuple(sh.global_offset)))
            p = sh.prepend_axis_num  # leading stacking axes (the LLM's layer index)
            inner_offsets, local, whole = tuple(sh.global_offset[p:]), tuple(sh.local_shape), tuple(sh.global_shape[p:])
            if sh.flattened_range is not None or any(inner_offsets[1:]) or local[1:] != whole[1:]:
                raise CheckpointError(
                    f"'{sh.key}' ({name}) is stored as a block {local} at {inner_offsets} of {whole}, not a row range; "
                    "this writer cannot produce it"
                )
            if not local:  # a 0-d tensor
                pieces.append(Piece(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), (1,) * p, sh.dtype,
                                    name, (0, 1)))
                shapes[name] = ()
                continue
            row_bytes = math.prod(local[1:]) * sh.dtype.itemsize
            global_shape = tuple(sh.global_shape)
            blocks = [(inner_offsets[0], inner_offsets[0] + local[0], False)]
            shapes[name] = whole
            if name in vocab_rows:  # stored padded for the written TP: real rows, then zero rows
                real, padded = vocab_rows[name]
                global_shape = (*global_shape[:p], padded, *global_shape[p + 1:])
                blocks = [(0, real, False)] + ([(real, padded, True)] if padded > real else [])
                shapes[name] = (real, *whole[1:])
            for start, stop, zeros in blocks:
                split = zeros or sliceable(name)
                for a, b in (_row_blocks(start, stop, row_bytes, max_piece_bytes) if split else [(start, stop)]):
                    offsets = (*sh.global_offset[:p], a, *inner_offsets[1:])
                    sizes = (*(1,) * p, b - a, *local[1:])
                    pieces.append(Piece(sh.key, global_shape, offsets, sizes, sh.dtype, name, (a, b), zeros))
    return Layout(pieces, objects, common, shapes)


# ------------------------------------------------------------------------------------------ torch DCP


def _planner_class():
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

    class PiecePlanner(SavePlanner):
        """Plans this process's pieces; `resolve_data` makes each only when the writer asks for it."""

        def __init__(self, pieces: list[Piece], objects: dict, produce: Callable[[Piece], torch.Tensor],
                     on_written: Callable[[int], object]):
            self._pieces = {MetadataIndex(p.key, p.offsets): p for p in pieces}
            self._objects, self._produce, self._on_written = objects, produce, on_written

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
            pass  # nothing is in the state dict: pieces are made on demand

        def create_local_plan(self) -> SavePlan:
            items = [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
            for index, p in self._pieces.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=torch.Size(p.sizes))
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=chunk, properties=TensorProperties(dtype=p.dtype), size=torch.Size(p.global_shape))))
            return SavePlan(items)

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan):
            return new_plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:  # as megatron packs a ShardedObject: [data]
                buf = io.BytesIO()
                torch.save([self._objects[write_item.index.fqn]], buf)
                return buf
            p = self._pieces[write_item.index]
            t = torch.zeros(p.sizes, dtype=p.dtype) if p.zeros else _as_piece(self._produce(p), p)
            self._on_written(p.nbytes)
            return t

    return PiecePlanner


def _as_piece(t: torch.Tensor, p: Piece) -> torch.Tensor:
    """Check a produced tensor against its piece; cast, add the stacking axes, own its storage."""
    if tuple(t.shape) != tuple(p.sizes[len(p.sizes) - t.dim():]) or t.numel() != math.prod(p.sizes):
        raise CheckpointError(f"our '{p.name}' rows {list(p.rows)} came out as {list(t.shape)}, but '{p.key}' "
                              f"{list(p.global_shape)} stores {list(p.sizes)} there; the weights do not match "
                              "the config")
    t = t.detach().to("cpu", p.dtype).reshape(p.sizes)
    if t.untyped_storage().nbytes() != t.nbytes:  # a view into a bigger tensor: torch.save would write all of it
        t = t.clone()
    return t


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class OnePieceAtATimeWriter(FileSystemWriter):
        """One file per process, written item by item: resolve, write, drop, next.

        (torch's FileSystemWriter keeps every tensor of a file referenced until the file is closed, and
        megatron's async writer stages all of them up front.) The byte format is torch's: each tensor
        `torch.save`d at its offset, ShardedObjects as raw bytes, so FileSystemReader reads it.
        """

        def __init__(self, path):
            super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)

        def write_data(self, plan, planner):
            file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            with open(Path(self.path) / file_name, "wb") as stream:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        torch.save(data, stream)
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(file_name, offset, length)))
                    del data
                if self.sync_files:
                    stream.flush()
                    os.fsync(stream.fileno())
            fut: Future = Future()
            fut.set_result(results)
            return fut

    return OnePieceAtATimeWriter


def assign(pieces: list[Piece], world: int) -> list[list[Piece]]:
    """Pieces per process: the biggest first to the least loaded, each process's list in layout order."""
    load, owner = [0] * world, {}
    for i in sorted(range(len(pieces)), key=lambda i: -pieces[i].nbytes):
        r = min(range(world), key=load.__getitem__)
        owner[i], load[r] = r, load[r] + pieces[i].nbytes
    return [[p for i, p in enumerate(pieces) if owner[i] == r] for r in range(world)]


def _unwrap(e: BaseException) -> BaseException:
    """The exception a DCP step raised on some rank (DCP wraps it in a CheckpointException)."""
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        inner = getattr(inner, "exception", inner)
        return inner[0] if isinstance(inner, tuple) else inner
    return e


def save(layout: Layout, ckpt_dir: str | Path, produce: Callable[[Piece], torch.Tensor], *,
         on_written: Callable[[int], object] = lambda n: None) -> None:
    """Collective over all processes (or one, without torch.distributed). `produce(piece)` returns the rows
    `piece.rows` of our tensor `piece.name` (any dtype; cast to the stored one here)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = assign(layout.pieces, world)[rank]
    planner = _planner_class()(mine, layout.objects if rank == 0 else {}, produce, on_written)
    group = dist.new_group(backend="gloo") if world > 1 else None  # DCP's plan exchange: CPU objects
    try:
        dcp.save({}, storage_writer=_writer_class()(str(ckpt_dir)), planner=planner, process_group=group,
                 no_dist=world == 1)
    except Exception as e:
        inner = _unwrap(e)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(
            f"{ckpt_dir}: writing the dist checkpoint failed ({type(inner).__name__}: {inner})") from e
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if rank == 0:
        torch.save(layout.common, Path(ckpt_dir) / COMMON_STATE_FNAME)
        strategy = get_default_save_sharded_strategy()
        save_config(CheckpointingConfig(strategy.backend, strategy.version), str(ckpt_dir))
