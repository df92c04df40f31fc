"""Let PyPI's torchvision (a CUDA build) import beside the CPU torch wheel.

PyPI's torchvision fails on import with "operator torchvision::nms does not exist": its C++ ops
do not load against torch 2.13.0+cpu, and `_meta_registrations.py` then registers fake kernels
for two ops that were never defined. transformers imports torchvision whenever it is installed,
and vLLM's InternVL path needs torchvision's transforms (not its C++ ops).

The fix defines the two op schemas with `torch.library` right before torchvision is imported, so
the fake registrations succeed. It is installed into the CPU venv only (`make venv` writes a .pth
that calls `install()`), never on GPU machines, and it is lazy: torch is not imported until
something imports torchvision.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keep the torch.library.Library alive for the life of the process


def define_missing_ops() -> None:
    global _LIB
    import torch

    missing = [name for name in _SCHEMAS if not _op_exists(torch, name)]
    if not missing:
        return
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _op_exists(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


if __name__ == "__main__":
    # `python tools/env/torchvision_cpu_fix.py` (run with the venv's python): copy this module into the
    # venv's site-packages and add the .pth line that calls install() at every interpreter start.
    import shutil
    import sysconfig
    from pathlib import Path

    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(__file__, site / "_engine_torchvision_cpu_fix.py")
    (site / "_engine_torchvision_cpu_fix.pth").write_text("import _engine_torchvision_cpu_fix as m; m.install()\n")
    print(f"installed the torchvision CPU fix into {site}")
