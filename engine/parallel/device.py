"""Where modules, batches and collective buffers live: the one helper that decides the device.

With CUDA every rank computes on its local GPU (`torch.cuda.set_device(LOCAL_RANK)` in
`engine.parallel.init.initialize`), otherwise on the CPU. Every placement in the engine goes through
`place_module` (models: trainable, frozen and reference copies), `place_batch` (micro-batches, copied
from pinned host memory with non_blocking=True) and `global_sum` (collectives on host values build
their tensor on `compute_device()`, as NCCL needs). A test can therefore watch every placement by
wrapping these functions (tests/engine/parallel/test_device_placement.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


def compute_device() -> torch.device:
    """The local GPU with CUDA (the one `initialize` selected), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def place_module(module: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer of `module` to the compute device (in place); returns it.

    megatron's RotaryEmbedding keeps `inv_freq` as a plain attribute, not a buffer, so `.to()` skips it;
    it is moved here too, so that nothing of a placed model stays behind on the host.
    """
    device = compute_device()
    module.to(device)
    for sub in module.modules():
        inv_freq = getattr(sub, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.device != device:
            sub.inv_freq = inv_freq.to(device)
    return module


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # pinned host memory makes the copy asynchronous; the caching host allocator keeps the pinned
        # buffer alive until the copy has run
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def place_tensor(t: torch.Tensor) -> torch.Tensor:
    return _to_device(t, compute_device())


def place_batch(batch: dict) -> dict:
    """A new dict with every tensor of the micro-batch on the compute device (lists, strings, None and
    PackedSeqParams' tensors included); the host dict is left as it was."""
    device = compute_device()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = _to_device(value, device)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # PackedSeqParams
            changes = {f.name: _to_device(getattr(value, f.name), device) for f in dataclasses.fields(value)
                       if isinstance(getattr(value, f.name), torch.Tensor)}
            out[key] = dataclasses.replace(value, **changes)
        else:
            out[key] = value
    return out


def global_sum(values: list[float], group=None) -> list[float]:
    """Sum host numbers over `group` (default: the world). The buffer is float64 on the compute device:
    NCCL reduces only device tensors, gloo host ones."""
    t = torch.tensor(values, dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, group=group)
    return t.tolist()
