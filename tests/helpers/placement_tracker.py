"""A CPU stand-in for "is this tensor on the GPU?": follows placement through every torch operation.

On a CPU machine every tensor lives on the CPU, so an operation that mixes a tensor the engine placed on the
compute device with one it forgot on the host runs fine here and fails only on a GPU ("Expected all tensors to be
on the same device"). This TorchFunctionMode marks what engine.parallel.device placed (modules' parameters and
buffers, batches, single tensors), propagates the mark to the outputs of every operation that reads a marked
tensor, and records each operation that reads both a marked tensor and an unmarked one with at least one
dimension: exactly the operations CUDA would refuse.

A tensor created with an explicit device (megatron's buffers, `device=x.device`, torch.distributed's own
buffers) is neutral: on CPU the tracker cannot tell whether that device was the host or the GPU, so it is never
reported, and what is computed from neutral tensors alone stays neutral. On the CPU a move to the compute device
returns the very same tensor, so `placed_copy` gives the placement helpers a copy to mark (the host original stays
a host tensor, as on a GPU), and `.cpu()` of a placed tensor gives an unmarked copy. Operations CUDA accepts across devices
are exempt: copies and moves (`to`, `copy_`, `cpu`, ...), indexing with host indices, and 0-dim host tensors
(CUDA takes those as scalars).
"""

from __future__ import annotations

import traceback
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[2]

# CUDA accepts a host tensor in these (a copy, a move, host indices), or they compute nothing
CROSS_DEVICE_OK = {
    "to", "cuda", "cpu", "copy_", "pin_memory", "is_pinned", "__getitem__", "__setitem__", "index_select",
    "tolist", "item", "numpy", "__len__", "size", "dim", "numel", "element_size", "data_ptr", "untyped_storage",
    "__repr__", "__format__", "__bool__", "__hash__", "__iter__",
}
BACK_TO_HOST = {"cpu", "tolist", "item", "numpy"}


def _flatten(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten(o, out)
    return out


class PlacementTracker(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self._placed: dict[int, weakref.ref] = {}
        self._neutral: dict[int, weakref.ref] = {}
        self.problems: list[str] = []
        self.mixed_ops = 0

    # ------------------------------------------------------------------ marks
    def mark(self, *objs, neutral: bool = False) -> None:
        table, other = (self._neutral, self._placed) if neutral else (self._placed, self._neutral)
        for t in _flatten(list(objs), []):
            table[id(t)] = weakref.ref(t)
            other.pop(id(t), None)

    def placed_copy(self, obj):
        """What a placement helper returned, with each tensor replaced by a marked copy (a batch dict, a
        PackedSeqParams in it, or one tensor)."""
        import dataclasses

        if isinstance(obj, torch.Tensor):
            copy = obj.clone()
            self.mark(copy)
            return copy
        if isinstance(obj, dict):
            return {k: self.placed_copy(v) for k, v in obj.items()}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(obj, **{f.name: self.placed_copy(getattr(obj, f.name))
                                               for f in dataclasses.fields(obj)
                                               if isinstance(getattr(obj, f.name), torch.Tensor)})
        return obj

    def mark_module(self, module: torch.nn.Module) -> None:
        self.mark(*module.parameters(), *module.buffers())
        for sub in module.modules():
            inv_freq = getattr(sub, "inv_freq", None)  # megatron's RoPE keeps it as a plain attribute
            if isinstance(inv_freq, torch.Tensor):
                self.mark(inv_freq)

    @staticmethod
    def _has(table: dict, t: torch.Tensor) -> bool:
        ref = table.get(id(t))
        return ref is not None and ref() is t

    def is_placed(self, t: torch.Tensor) -> bool:
        return self._has(self._placed, t)

    # ------------------------------------------------------------------ propagation
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = _flatten([args, kwargs], [])
        placed = any(self._has(self._placed, t) for t in tensors)
        neutral = kwargs.get("device") is not None or any(self._has(self._neutral, t) for t in tensors)
        if placed and name not in CROSS_DEVICE_OK:
            host = [t for t in tensors if t.dim() > 0 and not self._has(self._placed, t)
                    and not self._has(self._neutral, t)]
            if host:
                self._report(name, host)
        out = func(*args, **kwargs)
        if name in BACK_TO_HOST:  # an explicit trip back to the host stays there
            if isinstance(out, torch.Tensor) and any(out is t for t in tensors):  # CPU: .cpu() returned itself
                out = out.clone()  # (inside the handler the mode is off: this clone is not seen)
            return out
        if placed:
            self.mark(out)
        elif neutral:
            self.mark(out, neutral=True)
        return out

    def _report(self, name: str, host: list[torch.Tensor]) -> None:
        stack = traceback.extract_stack()[:-2]
        if any("torch/distributed/" in f.filename for f in stack):
            return  # torch.distributed's own buffers follow the backend's device rules, not ours
        self.mixed_ops += 1
        frames = [f for f in stack if f.filename.startswith(str(REPO)) and "/tests/" not in f.filename
                  and not f.filename.endswith("cpu_compat.py")]  # its TorchFunctionMode is not the caller
        where = f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno}" if frames else "?"
        shapes = ", ".join(str(tuple(t.shape)) for t in host[:3])
        line = f"{where}: {name} reads a device tensor and host tensor(s) {shapes}"
        if line not in self.problems:
            self.problems.append(line)
