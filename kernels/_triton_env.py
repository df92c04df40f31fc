"""The one place that decides how Triton runs: compiled on a CUDA GPU, interpreted on CPU.

`TRITON_INTERPRET=1` must be in the environment before `triton` itself is imported: the
`triton.language` builtins (tl.max, tl.sum, ...) are `@triton.jit` functions decorated at import
time, and decorating them in compiled mode makes them uncallable from interpreted kernels later
("Cannot call @triton.jit'd outside of the scope of a kernel"). So every module in `kernels/`
imports triton through this file, and this file sets the variable when there is no CUDA device.
On a GPU machine nothing is changed, and an explicit TRITON_INTERPRET (e.g. 0, to compile
kernels for a GPU target on a CPU machine) is always respected.
"""

import contextlib
import os
import sys

import numpy as np
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise ImportError(
            "triton was imported before `kernels` on a machine without CUDA, so it is in compiled "
            "mode and its kernels cannot run on CPU. Import `kernels` first, or export "
            "TRITON_INTERPRET=1 before starting Python."
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""True when kernels run in the Triton interpreter (CPU tensors), False when compiled (CUDA)."""


def quiet_masked_lanes():
    """Context for kernel launches: in the interpreter, masked-off lanes (rows past T, columns past V)
    really compute log(0), 0/0 or exp overflow in numpy before the masked store drops them; those
    RuntimeWarnings are noise. Compiled kernels are unaffected (nullcontext)."""
    if INTERPRET:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")
    return contextlib.nullcontext()


def check_device(tensor: torch.Tensor, name: str) -> None:
    """Raise if `tensor` lives where the current Triton mode cannot run kernels."""
    if INTERPRET and tensor.device.type != "cpu":
        raise ValueError(
            f"{name} is on {tensor.device}, but Triton runs in interpreter mode (TRITON_INTERPRET=1), "
            "which only handles CPU tensors. Unset TRITON_INTERPRET on a CUDA machine."
        )
    if not INTERPRET and tensor.device.type != "cuda":
        raise ValueError(
            f"{name} is on {tensor.device}, but Triton is in compiled mode and needs CUDA tensors. "
            "Move the tensor to the GPU, or set TRITON_INTERPRET=1 before importing `kernels` "
            "to run on CPU (slow; for tests)."
        )


__all__ = ["INTERPRET", "check_device", "quiet_masked_lanes", "tl", "triton"]
