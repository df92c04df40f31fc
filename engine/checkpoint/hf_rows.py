"""Our full tensors, or row ranges of them, read from HF safetensors with plain file reads.

safetensors' own reader memory-maps the file, and every page a read touches counts in the process's
RSS while the file is open: reading a 1 GB tensor shows ~2 GB (the mapped pages + the copy). Here each
file's header is parsed once and a tensor, or a range of its rows, is read with `readinto` straight into
the tensor it becomes, so a read costs its own size and nothing more.

`HFRows` maps each of our tensors (keymap names) to its HF source: `copy` and `cat` tensors (the
embedding, output layer, fc1 = [gate; up], fc2, o_proj, ...) are served by row range without reading
the rest; the fused kinds (q/k/v interleaves, ViT head padding) are read whole and fused (keymap.fuse).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.hf_io import CheckpointError, HFReader
from engine.checkpoint.keymap import Mapping, fuse

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ROW_SLICEABLE = ("copy", "cat")  # fuse kinds whose rows are rows of the HF tensors, in order


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file


class RawSafetensors:
    """name -> tensor / row range over a HF checkpoint directory, by plain reads (no mmap)."""

    def __init__(self, reader: HFReader):
        self.reader = reader
        self._headers: dict[Path, dict[str, _Entry]] = {}

    def _header(self, file: Path) -> dict[str, _Entry]:
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
                size = file.stat().st_size
                entries = {}
                for name, e in header.items():
                    if name == "__metadata__":
                        continue
                    dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
                    begin, end = e["data_offsets"]
                    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                        raise ValueError(f"'{name}' does not fit the file ({size} bytes)")
                    entries[name] = _Entry(file, dtype, shape, 8 + n + begin)
            except Exception as e:
                raise CheckpointError(
                    f"{file}: cannot read as safetensors ({e}); the file is corrupted, re-download it") from None
            self._headers[file] = entries
        return self._headers[file]

    def entry(self, name: str, needed_for: str = "") -> _Entry:
        return self._header(self.reader.file_of(name, needed_for))[name]

    def read(self, name: str, start: int = 0, stop: int | None = None, needed_for: str = "") -> torch.Tensor:
        """Rows [start, stop) of `name` (all of it by default), in its stored dtype."""
        e = self.entry(name, needed_for)
        if not e.shape:  # a 0-d tensor: no rows to choose
            start, stop, rest = 0, 1, ()
        else:
            stop = e.shape[0] if stop is None else stop
            rest = e.shape[1:]
        row_bytes = math.prod(rest) * e.dtype.itemsize
        out = torch.empty((stop - start, *rest) if e.shape else (), dtype=e.dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.start + start * row_bytes)
            got = 0
            while got < len(buf):  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(buf[got:])
                if not n:
                    raise CheckpointError(f"{e.file}: '{name}' is cut short; the file is truncated, re-download it")
                got += n
        return out


class HFRows:
    """Our full tensors (keymap names) and row ranges of them, from one or several HF sources."""

    def __init__(self, sources: dict, mcfg):
        """sources: part -> convert.Source (or None: that part has no HF source)."""
        self.mcfg = mcfg
        self._maps: dict[str, tuple[RawSafetensors, Mapping]] = {}
        for part, src in sources.items():
            if src is None or part not in src.adapter.parts:
                continue
            raw = RawSafetensors(src.reader)
            for group in src.adapter.groups(mcfg, parts=[part]):
                for m in group.maps:
                    self._maps[m.ours] = (raw, m)

    def __contains__(self, name: str) -> bool:
        return name in self._maps

    def sliceable(self, name: str) -> bool:
        return self._maps[name][1].fuse in ROW_SLICEABLE

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Before anything is written: every HF tensor exists, and row-served ones have our shape."""
        raw, m = self._maps[name]
        entries = [raw.entry(n, name) for n in m.hf]
        if m.fuse not in ROW_SLICEABLE:
            return  # checked after fusing (rows)
        rows = sum(e.shape[0] if e.shape else 1 for e in entries)
        if any(e.shape[1:] != tuple(shape[1:]) for e in entries) or rows != (shape[0] if shape else 1):
            got = " + ".join(f"{n} {list(e.shape)}" for n, e in zip(m.hf, entries))
            raise CheckpointError(
                f"{raw.reader.dir}: {got} cannot fill our '{name}' of shape {list(shape)}; the weights do not "
                "match config.json"
            )

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of our full tensor `name` (HF dtype)."""
        raw, m = self._maps[name]
        if m.fuse in ROW_SLICEABLE:
            parts, base = [], 0
            for n in m.hf:  # `cat`: our rows are the HF tensors' rows one after another
                e = raw.entry(n, name)
                count = e.shape[0] if e.shape else 1
                lo, hi = max(start, base), min(stop, base + count)
                if lo < hi:
                    parts.append(raw.read(n, lo - base, hi - base, name))
                base += count
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        # fused kinds are read whole (megatron stores each as one block at TP=1, so this runs once per tensor)
        full = fuse(m.fuse, [raw.read(n, needed_for=name) for n in m.hf], self.mcfg)
        return full if (start, stop) == (0, full.shape[0]) else full[start:stop]
