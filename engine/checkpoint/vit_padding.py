"""Load a dist checkpoint into a model whose ViT heads are padded differently (any TP from any TP).

A ViT whose heads TP does not divide is built with extra all-zero heads (`model.vision.padded_num_heads`:
InternViT-6B's 25 -> 32 for TP=8), and they are stored that way. A checkpoint written at TP=1 (no padding)
therefore holds `[3*25*d, C]` q/k/v rows where a TP=8 model asks for `[3*32*d, C]`, and megatron's loader
refuses the shape. The real heads come first in both layouts (keymap's per-head [q, k, v] interleave), so
each rank reads its own rows of the real heads straight from the stored tensor and fills the rest with
the padding value (zero weights, one for the q/k norm scale: what a conversion at that TP writes). Padded
heads of the stored tensor that the model does not have are checked to be zero (training keeps them
zero: their outputs and gradients are zero) -- a checkpoint with non-zero ones is refused, not truncated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from engine.checkpoint.dcp_slices import read_slices, stored_tensors
from engine.checkpoint.hf_io import CheckpointError

# per-layer ViT tensors with a head axis: kind -> (axis, rows per head in units of head_dim, padding value)
_HEAD_TENSORS = {
    "linear_qkv.weight": (0, 3, 0.0), "linear_qkv.bias": (0, 3, 0.0),  # per head [q, k, v]
    "linear_proj.weight": (1, 1, 0.0),  # columns
    "q_norm.weight": (0, 1, 1.0), "k_norm.weight": (0, 1, 1.0),
}
_KEY = re.compile(r"(?:^|\.)vision\.layers\.\d+\.attn\.(" + "|".join(re.escape(k) for k in _HEAD_TENSORS) + ")$")


def _head_tensors(sharded: dict, stored: dict, path=()) -> dict:
    """(path in the nested sharded state dict) -> ShardedTensor, for ViT head tensors whose stored shape differs."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for k, v in sharded.items():
        if isinstance(v, dict):
            out.update(_head_tensors(v, stored, path + (k,)))
        elif isinstance(v, ShardedTensor) and _KEY.search(v.key) and v.key in stored \
                and tuple(stored[v.key].size) != tuple(v.global_shape):
            out[path + (k,)] = v
    return out


def _pop(d: dict, path: tuple):
    for k in path[:-1]:
        d = d[k]
    return d.pop(path[-1])


def _put(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def load_sharded(sharded: dict, ckpt_dir: str | Path, saved_model_config: Callable[[], object]) -> dict:
    """megatron `dist_checkpointing.load(sharded, ckpt_dir)`, re-padding ViT heads stored with another padding.

    `saved_model_config()`: the checkpoint's ModelConfig (its real head count and head size), asked for only
    when a re-padding is needed. Returns the loaded state dict, nested like `sharded`, every entry filled.
    Collective like megatron's load.
    """
    from megatron.core import dist_checkpointing

    stored = stored_tensors(ckpt_dir)
    repad = _head_tensors(sharded, stored)
    for path in repad:
        _pop(sharded, path)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    if not repad:
        return state
    vision = saved_model_config().vision
    real, d = vision.num_attention_heads, vision.head_dim
    slices, filled, checks = {}, {}, {}
    for path, sh in repad.items():
        axis, per_head, pad = _HEAD_TENSORS[_KEY.search(sh.key).group(1)]
        unit = per_head * d  # rows (or columns) per head
        have, want = tuple(stored[sh.key].size), tuple(sh.global_shape)
        other_dims_match = all(h == w for i, (h, w) in enumerate(zip(have, want)) if i != axis)
        if len(have) != len(want) or not other_dims_match or have[axis] % unit or want[axis] % unit \
                or min(have[axis], want[axis]) < real * unit:
            raise CheckpointError(
                f"{ckpt_dir}: '{sh.key}' is stored as {list(have)}, the model asks for {list(want)}: not the same "
                f"{real}-head ViT padded differently; the checkpoint's model config does not match its weights"
            )
        start, count = sh.global_offset[axis], sh.local_shape[axis]
        stop = min(start + count, have[axis])  # stored rows of this rank's range (real heads, maybe padding)
        local = torch.full(sh.local_shape, pad, dtype=sh.data.dtype)
        if start < stop:
            block = torch.empty([stop - start if i == axis else n for i, n in enumerate(sh.local_shape)],
                                dtype=stored[sh.key].properties.dtype)
            offsets = tuple(start if i == axis else 0 for i in range(len(have)))
            slices[sh.key] = (offsets, block)
        filled[path] = (sh, local, axis, unit, pad, start, stop)
        if pad == 0.0 and have[axis] > want[axis] and _first_rank():  # stored padding the model drops
            block = torch.empty([have[axis] - want[axis] if i == axis else n for i, n in enumerate(have)],
                                dtype=stored[sh.key].properties.dtype)
            checks[sh.key] = (tuple(want[axis] if i == axis else 0 for i in range(len(have))), block)
    read_slices(ckpt_dir, slices, "ViT heads to re-pad")
    read_slices(ckpt_dir, checks, "ViT padding heads")
    for path, (sh, local, axis, unit, pad, start, stop) in filled.items():
        if sh.key in slices:
            block = slices[sh.key][1]
            real_rows = max(0, min(stop, real * unit) - start)  # the rest of the block is stored padding
            if pad == 0.0:  # (q/k norm scales of padding heads multiply zeros: any value is padding)
                _check_zero(block.narrow(axis, real_rows, block.shape[axis] - real_rows), sh.key, ckpt_dir)
            local.narrow(axis, 0, real_rows).copy_(block.narrow(axis, 0, real_rows))
        _put(state, path, local)
    for key, (_, block) in checks.items():
        _check_zero(block, key, ckpt_dir)
    return state


def _first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _check_zero(t: torch.Tensor, key: str, ckpt_dir) -> None:
    if t.numel() and bool(t.ne(0).any()):
        raise CheckpointError(
            f"{ckpt_dir}: the padding heads of '{key}' are not zero, so they are not padding; load this checkpoint "
            "with the ViT padding it was written with (model.vision.padded_num_heads)"
        )


__all__ = ["load_sharded"]
