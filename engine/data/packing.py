"""First-fit-decreasing packing of sample lengths into rows of `capacity` tokens.

The native core (`csrc/packer.cpp`, built by `pip install -e .` through CMakeLists.txt) and the Python
fallback below run the same algorithm: items longest first (stable for equal lengths), each into the
lowest-numbered row with room, found with a max segment tree over the rows' free space. Both give
identical packs (tests/engine/data/test_packing.py); the fallback is ~50x slower (tools/bench_data.py).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("engine.data")

try:
    from engine.data import _packer_native

    NATIVE_ERROR = ""
except ImportError as e:  # not built: see build/native_build.log, rebuild with `pip install -e .`
    _packer_native = None
    NATIVE_ERROR = str(e)


def native_available() -> bool:
    return _packer_native is not None


def _check(lengths: np.ndarray, capacity: int) -> None:
    if capacity <= 0:
        raise ValueError("capacity must be > 0")
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths <= 0) | (lengths > capacity))[0])
        raise ValueError(f"item {bad} has length {int(lengths[bad])}, outside [1, capacity={capacity}]")


def pack_ffd_python(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python FFD. Returns (items, offsets): row b holds items[offsets[b]:offsets[b+1]]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    _check(lengths, capacity)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable").tolist()
    size = 1
    while size < max(n, 1):
        size <<= 1
    tree = [capacity] * (2 * size)  # free space per row at the leaves; max of children above
    bin_of = [0] * n
    num_bins = 0
    lens = lengths.tolist()
    for item in order:
        need = lens[item]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        tree[node] -= need
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node >>= 1
        bin_of[item] = b
        if b >= num_bins:
            num_bins = b + 1
    bins = np.asarray(bin_of, dtype=np.int64)
    placed = np.asarray(order, dtype=np.int64)
    items = placed[np.argsort(bins[placed], kind="stable")]  # by row, placement order within a row
    offsets = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bins, minlength=num_bins), out=offsets[1:])
    return items, offsets


def pack_ffd(lengths, capacity: int, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """FFD with the native core when built (impl="auto"), or force impl="native" / "python"."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if impl == "python" or (impl == "auto" and _packer_native is None):
        return pack_ffd_python(lengths, capacity)
    if _packer_native is None:
        raise RuntimeError(f"native packer not built ({NATIVE_ERROR}); run `pip install -e .` (log: build/native_build.log)")
    _check(lengths, capacity)
    return _packer_native.pack_ffd(lengths, capacity)


def pack_rows(lengths, capacity: int, impl: str = "auto") -> list[list[int]]:
    """FFD as a list of rows, each a list of item indices."""
    items, offsets = pack_ffd(lengths, capacity, impl)
    return [items[offsets[b] : offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]


if _packer_native is None:
    log.warning("native packer not built (%s); using the pure-Python packer. Rebuild: pip install -e . "
                "(log: build/native_build.log)", NATIVE_ERROR)
