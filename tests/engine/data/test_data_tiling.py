"""Tiling follows InternVL's rule exactly, tie-break included (oracle: InternVL's code, copied verbatim)."""

from __future__ import annotations

import itertools

import pytest

from engine.data.tiling import choose_grid, num_tiles


def internvl_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    # Verbatim from OpenGVLab/InternVL (internvl_chat/internvl/train/dataset.py), the reference.
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def internvl_grid(width, height, min_num, max_num, image_size):
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return internvl_find_closest_aspect_ratio(width / height, target_ratios, width, height, image_size)


SIDES = [1, 2, 13, 100, 223, 224, 300, 447, 448, 449, 500, 671, 672, 673, 896, 897, 1000, 1344, 1792, 2000, 4000]


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 12), (1, 6), (2, 8), (1, 1), (4, 4), (1, 40)])
def test_matches_internvl_on_many_sizes(min_tiles, max_tiles):
    for w, h in itertools.product(SIDES, SIDES):
        assert choose_grid(w, h, 448, min_tiles, max_tiles) == internvl_grid(w, h, min_tiles, max_tiles, 448), (w, h)


def test_tie_rule_depends_on_area():
    # With max 4 tiles, aspect 1.5 is equidistant from 1x1 / 2x2 (1.0) and 2x1 (2.0): a later grid wins
    # a tie only when the image area exceeds half of that grid's (0.5 * 448^2 * cols * rows).
    assert choose_grid(300, 200, 448, 1, 4) == (1, 1)  # area 60000
    assert choose_grid(600, 400, 448, 1, 4) == (2, 1)  # 240000 > 200704 (2x1), not > 401408 (2x2)
    assert choose_grid(900, 600, 448, 1, 4) == (2, 2)  # 540000 > 401408
    assert choose_grid(300, 200, 448, 1, 12) == (3, 2)  # with 6 tiles allowed, 3x2 matches 1.5 exactly
    # Square images: 1x1, 2x2, 3x3 all have diff 0; larger grids need more pixels.
    assert choose_grid(448, 448, 448, 1, 12) == (1, 1)  # 200704 is not > 0.5*448^2*4 = 401408
    assert choose_grid(700, 700, 448, 1, 12) == (2, 2)  # 490000 > 401408, not > 903168 (3x3)
    assert choose_grid(1000, 1000, 448, 1, 12) == (3, 3)


def test_edge_shapes():
    assert choose_grid(20000, 100, 448, 1, 12) == (12, 1)  # extreme panorama: widest allowed grid
    assert choose_grid(100, 20000, 448, 1, 12) == (1, 12)
    assert choose_grid(1, 1, 448, 1, 12) == (1, 1)
    assert choose_grid(1, 1, 448, 2, 12) == (2, 2)  # min_tiles=2 excludes 1x1; 2x2 is the square one
    assert num_tiles(1, 1, 448, 1, 12, thumbnail=True) == 1  # a single tile gets no thumbnail
    assert num_tiles(20000, 100, 448, 1, 12, thumbnail=True) == 13
    assert num_tiles(20000, 100, 448, 1, 12, thumbnail=False) == 12
