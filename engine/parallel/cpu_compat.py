"""Make megatron-core 0.16.1 run on CPU with gloo. Active only when CUDA is unavailable.

Every CUDA assumption we patch is listed here, with where megatron hits it
(see docs/platform.md for the measurements). Nothing else in the engine patches megatron.

1. `torch.cuda.current_device()` (~175 call sites: mappings, layers, rotary, global memory
   buffer, p2p, DDP buffers) -> the CPU device.
2. Hard-coded `device="cuda"` (pipeline_parallel/schedules.py: total_num_tokens, ...) and
   `Tensor.cuda()` / `Module.cuda()` -> a TorchFunctionMode that rewrites cuda devices to cpu, and
   `.cuda()` as a no-op.
3. `torch.cuda.synchronize()` (p2p with batch_p2p_sync, checkpoint saving) -> no-op.
4. The distributed optimizer and grad clipping accept only `torch.cuda.*Tensor` type strings
   (distrib_optimizer.py ~361/~420, optimizer.py ~671, clip_grads.py ~167) -> `Tensor.type()` with
   no argument reports the cuda name for CPU tensors.
5. RNG: `CudaRNGStatesTracker.add/fork` call `torch.cuda.get_rng_state()`; the tracker is needed
   even with dropout 0 (attention forks it) -> `CPURNGStatesTracker`, which keeps CPU generator
   states and uses megatron's own seed offsets (`model_parallel_cuda_manual_seed` still decides them).
6. Activation recomputation (`tensor_parallel.checkpoint`, `CheckpointWithoutOutput`) saves and restores the
   CUDA RNG state through `random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU generator's state.
7. Import: megatron.core.jit binds `jit_fuser = torch.compile` and its fusion modules decorate functions with it
   at import, which imports torch._dynamo and inductor (~1.7 CPU-s per process, every torchrun worker) ->
   `eager_megatron_fusions()`, called by `engine/__init__.py` before anything imports megatron: megatron's own
   `disable_jit_fuser()`, so those functions run as plain torch on CPU (the same math, uncompiled).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE: TorchFunctionMode | None = None


def _cpu_device(device):
    """Map a cuda device spec to cpu; leave anything else alone."""
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # torch.cuda.current_device()-style ordinals
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=` arguments that name CUDA to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's tracker with CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker_CPU = CPURNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED or not isinstance(
            mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker
        ):
            mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_init
    mrandom.initialize_rng_tracker = initialize_rng_tracker


def eager_megatron_fusions() -> None:
    """Item 7: without CUDA, megatron's jit fusions are plain functions (its `disable_jit_fuser`), and its import
    does not pull in torch.compile's machinery. Must run before the first `import megatron`; a no-op on CUDA or
    when megatron is already imported (then its functions keep torch.compile, which is correct, only slower to
    import)."""
    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return
    compile_fn = torch.compile

    def no_compile(model=None, **kwargs):  # torch.compile's decorator forms, without compiling
        return model if model is not None else (lambda fn: fn)

    torch.compile = no_compile  # only while megatron.core's package imports its fusion modules
    try:
        import megatron.core.jit as megatron_jit

        megatron_jit.disable_jit_fuser()  # modules imported later get megatron's no-op decorator
    finally:
        torch.compile = compile_fn


def activate() -> bool:
    """Install the CPU patches once, only if CUDA is unavailable. Returns whether they are active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type

    _install_rng_tracker()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
