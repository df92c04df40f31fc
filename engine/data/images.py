"""The PIL reference image pipeline (InternVL's transform) and the pipeline factory.

The interface, the tile contract and the checks both pipelines share are in `image_common.py`; the DALI
implementation is in `image_dali.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.data.errors import DataError
from engine.data.image_common import (  # noqa: F401  (re-exported: the names callers import from here)
    IMAGENET_MEAN, IMAGENET_STD, ImageInfo, ImagePipeline, TiledImage, TileSpec, decode_rgb, grid_to_tiles, normalise,
    probe, read_checked,
)


class PilImagePipeline:
    """Reference implementation: InternVL's transform (PIL bicubic resize, crop, thumbnail, normalise)."""

    name = "pil"

    def __init__(self, spec: TileSpec):
        self.spec = spec

    def process_one(self, path: Path) -> TiledImage:
        data, info = read_checked(path, self.spec)
        img = decode_rgb(data, info)
        cols, rows = info.grid(self.spec)
        t = self.spec.tile_size
        resized = img.resize((t * cols, t * rows), Image.Resampling.BICUBIC)
        full = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        tiles = grid_to_tiles(full, cols, rows, t)
        if self.spec.thumbnail and cols * rows > 1:
            thumb = img.resize((t, t), Image.Resampling.BICUBIC)
            thumb_t = torch.from_numpy(np.asarray(thumb).copy()).permute(2, 0, 1)  # (3, T, T)
            tiles = torch.cat([tiles, thumb_t[None]], dim=0)
        return TiledImage(normalise(tiles), (cols, rows))

    def process(self, paths: list[Path]) -> list[TiledImage | DataError]:
        out: list[TiledImage | DataError] = []
        for p in paths:
            try:
                out.append(self.process_one(p))
            except DataError as e:
                out.append(e)
        return out


def build_image_pipeline(kind: str, spec: TileSpec, dali_device: str = "auto") -> ImagePipeline:
    """`kind` = "pil" | "dali" (data.image_pipeline)."""
    if kind == "pil":
        return PilImagePipeline(spec)
    if kind == "dali":
        from engine.data.image_dali import DaliImagePipeline

        return DaliImagePipeline(spec, device=dali_device)
    raise ValueError(f"data.image_pipeline={kind!r}: use 'dali' or 'pil'")
