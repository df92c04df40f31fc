"""The one writer of checkpoint directories: all-or-nothing, with a checksum of every file.

Every checkpoint directory the engine writes goes through `atomic_output_dir` (training steps and the
frozen reference in engine/train/checkpointing.py, `mcore_io.save_checkpoint`, `hf-to-mcore`, `assemble`
and `mcore-to-hf` in engine/checkpoint/convert.py):

1. every rank writes its part into `<out>.partial` (a stale one, left by a killed writer, is removed first);
2. the ranks agree that all of them succeeded; if one failed, every rank raises and the partial dir is
   removed (a full disk says so: "disk full while writing ...");
3. the files are hashed (sha256, the work shared among the ranks), flushed to disk (fsync) and listed with
   their sizes and hashes in `<out>.partial/checksums.json`;
4. `<out>.partial` is renamed to `<out>` (an existing `<out>` is replaced only with `force`).

`verify_checksums(dir)` re-hashes a checkpoint (again shared among the ranks) and lists what is wrong:
a missing file, a wrong size (truncated), a different hash (bit-rot, a partial copy). Loaders call it
before reading; `--resume auto` falls back to an older checkpoint when the newest is damaged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from engine.checkpoint.hf_io import CheckpointError

CHECKSUMS = "checksums.json"
_HASH_BLOCK = 8 << 20  # bytes read per call while hashing: big enough for disk throughput, small in memory
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space / quota exceeded / file size limit
# A write failure with less free space than this is a full disk, whatever the error says: torch's zip writer
# reports ENOSPC as "unexpected pos ..." (seen on a full tmpfs). 64 MiB: less than one shard of any real model.
_LOW_SPACE = 64 << 20


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))




def _all_ok(ok: bool) -> bool:
    """Collective: whether every rank reports ok."""
    if _world() == 1:
        return ok
    from engine.parallel.device import global_sum

    return global_sum([0.0 if ok else 1.0])[0] == 0


def _gather(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_error(e: BaseException) -> bool:
    """An error to report, not an interruption. torch DCP's CheckpointException derives from BaseException, so
    `except Exception` misses it."""
    return not isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


def disk_full_cause(e: BaseException) -> OSError | None:
    """The OSError(ENOSPC / EDQUOT / EFBIG) behind `e`, looking through causes and torch DCP's per-rank failures."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return x
        for inner in (getattr(x, "failures", None) or {}).values():  # torch DCP's CheckpointException
            todo.append(inner[0] if isinstance(inner, tuple) else getattr(inner, "exception", inner))
        todo += [x.__cause__, x.__context__]
    return None


def short_error(e: BaseException) -> str:
    """The root cause of a DCP failure (its message otherwise carries every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        inner = getattr(inner, "exception", inner)
        if isinstance(inner, tuple):  # (exception, traceback frames)
            inner = inner[0]
        return f"{type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def _hash_file(path: Path, sync: bool) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _share(files: list[tuple[str, int]]) -> list[str]:
    """This rank's part of the files: the biggest first, each to the rank with the fewest bytes so far."""
    loads = [0] * _world()
    mine = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = loads.index(min(loads))
        loads[r] += size
        if r == rank():
            mine.append(name)
    return mine


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def _hash_tree(root: Path, sync: bool) -> dict[str, dict]:
    """Collective: {relative path: {size, sha256}} of every file under root, hashed in parallel by the ranks."""
    files = _broadcast(_listing(root) if rank() == 0 else None)  # one listing, so every rank splits the same list
    mine, error = {}, None
    try:
        mine = {name: _hash_file(root / name, sync) for name in _share(files)}
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    parts = _gather((mine, error))
    errors = [err for _, err in parts if err]
    if errors:
        raise CheckpointError(f"{root}: reading back the written files failed ({errors[0]})")
    return {name: info for part, _ in parts for name, info in part.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output_dir(out: str | Path, force: bool):
    """Collective over all ranks. Yield `<out>.partial` to write into; on success write checksums.json and rename
    it to `out` (replacing a non-empty `out` only with force). On failure of any rank every rank raises and the
    partial dir is removed."""
    out = Path(out)
    if is_nonempty(out) and not force:
        raise CheckpointError(f"output {out} exists and is not empty; pass --force to replace it")
    tmp = out.parent / f"{out.name}.partial"
    if rank() == 0:
        _remove(tmp)  # left by a killed writer
        tmp.mkdir(parents=True)
    _barrier()
    failure: BaseException | None = None
    try:
        yield tmp
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        failure = e
    try:
        if not _all_ok(failure is None):
            raise failure if failure is not None else CheckpointError(
                f"writing {out} failed on another rank (its own error is in its log); nothing was kept")
        sums = _hash_tree(tmp, sync=True)
        if rank() == 0:
            (tmp / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": sums}, indent=1) + "\n")
            _fsync_dir(tmp)
            if out.exists():
                old = out.parent / f"{out.name}.replaced"
                _remove(old)
                out.rename(old)
                tmp.rename(out)
                _remove(old)
            else:
                tmp.rename(out)
            _fsync_dir(out.parent)
        _barrier()
    except BaseException as e:
        free = shutil.disk_usage(out.parent).free  # before the partial files are removed
        if rank() == 0:
            _remove(tmp)
        if not is_error(e):
            raise
        full = disk_full_cause(e)
        if full is not None or free < _LOW_SPACE:
            why = f"{os.strerror(full.errno)}: {full.filename or full}" if full is not None else short_error(e)
            raise CheckpointError(
                f"disk full while writing {out} ({free >> 20} MiB free; {why}); the partial {tmp.name} was removed. "
                f"Free space on that disk (df -h {out.parent}), lower train.keep_checkpoints, or write elsewhere"
            ) from e
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"writing {out} failed ({short_error(e)}); the partial {tmp.name} was removed") from e


def verify_checksums(ckpt_dir: str | Path) -> list[str]:
    """Collective when torch.distributed is initialised (every rank must call it). What is wrong with the
    checkpoint's files against its checksums.json, [] when intact. A checkpoint without checksums.json (written
    before checksums existed, or by another tool) gives ["no checksums.json ..."]: the caller decides."""
    d = Path(ckpt_dir)
    listed = None
    if rank() == 0:
        try:
            listed = json.loads((d / CHECKSUMS).read_text())["files"]
        except FileNotFoundError:
            listed = "missing"
        except (OSError, ValueError, KeyError, TypeError) as e:
            listed = f"unreadable: {type(e).__name__}: {e}"
    listed = _broadcast(listed)
    if listed == "missing":
        return [f"no {CHECKSUMS} (written by an older version or another tool): its files cannot be verified"]
    if isinstance(listed, str):
        return [f"{CHECKSUMS} is {listed}"]
    problems = []
    for name in _share([(n, int(info["size"])) for n, info in listed.items()]):
        path, want = d / name, listed[name]
        try:
            size = path.stat().st_size
            if size != want["size"]:
                problems.append(f"{name} has {size} bytes, {want['size']} were written (truncated or overwritten)")
            elif _hash_file(path, sync=False)["sha256"] != want["sha256"]:
                problems.append(f"{name} does not match its sha256 (bit-rot or a damaged copy)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror or e})")
    return sorted(p for part in _gather(problems) for p in part)


def describe(problems: list[str], limit: int = 3) -> str:
    """The first few problems, and how many more."""
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def require_intact(ckpt_dir: str | Path) -> None:
    """Collective. CheckpointError naming what is wrong when a file does not match checksums.json. A checkpoint
    without checksums.json (older, or written by another tool) passes unverified."""
    problems = [p for p in verify_checksums(ckpt_dir) if not p.startswith(f"no {CHECKSUMS}")]
    if problems:
        raise CheckpointError(f"{ckpt_dir} is damaged: {describe(problems)}; use another copy of it, or an older "
                              "checkpoint")
