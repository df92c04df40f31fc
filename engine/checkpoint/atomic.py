"""Write a checkpoint directory all-or-nothing: into `<out>.partial`, renamed to `<out>` when complete."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from engine.checkpoint.hf_io import CheckpointError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def atomic_output_dir(out: str | Path, force: bool):
    """Yield `<out>.partial`; rename it to `out` on success (replacing it only with force)."""
    out = Path(out)
    if _is_nonempty(out) and not force:
        raise CheckpointError(f"output {out} exists and is not empty; pass --force to replace it")
    tmp = out.parent / f"{out.name}.partial"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed conversion
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            if out.exists():
                old = out.parent / f"{out.name}.replaced"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                tmp.rename(out)
        _barrier()
    except BaseException:
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
