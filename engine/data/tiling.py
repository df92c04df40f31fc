"""InternVL dynamic tiling: which (cols, rows) grid an image of size (W, H) is cut into.

Same rule and tie-break as InternVL's `dynamic_preprocess` / `find_closest_aspect_ratio`: among grids
with min_tiles <= cols*rows <= max_tiles (ordered by tile count), take the one whose aspect ratio
cols/rows is closest to W/H; on an exact tie the later (larger) grid wins only when the image's pixel
area exceeds half of that grid's, 0.5 * tile^2 * cols * rows.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Built exactly as InternVL does (a set, then a stable sort by tile count), so equal-count grids keep
    # the same relative order and the tie-break sees the same sequence.
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) for an image of `width` x `height` pixels."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int, thumbnail: bool) -> int:
    """Tiles the image becomes, thumbnail included (added only when the grid has more than one tile)."""
    cols, rows = choose_grid(width, height, tile_size, min_tiles, max_tiles)
    return cols * rows + (1 if thumbnail and cols * rows > 1 else 0)
