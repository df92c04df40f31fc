"""What both image pipelines share: the interface, the tile contract, and every check that decides
whether an image is usable.

Both implementations (PIL in `images.py`, DALI in `image_dali.py`) turn a list of image files into
`TiledImage`s: float32 `[n_tiles, 3, T, T]` normalised with ImageNet mean/std, tiles in row-major grid
order, then the thumbnail (when the grid has more than one tile and `thumbnail` is on). Everything that
decides *whether* an image is usable (header probe, file structure, decodability, mode conversion) lives
here, so both implementations accept and reject the same files (tested on corrupted JPEGs and PNGs).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.data.errors import DataError
from engine.data.tiling import choose_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Modes converted with PIL's own .convert("RGB") (what InternVL does: alpha is dropped, not blended).
PLAIN_MODES = {"RGB", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "1", "RGBX", "La"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass(frozen=True)
class TileSpec:
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    max_pixels: int = 100_000_000


@dataclass
class ImageInfo:
    """What the header says; enough to plan token counts without decoding."""

    path: Path
    width: int
    height: int
    mode: str
    format: str

    def grid(self, spec: TileSpec) -> tuple[int, int]:
        return choose_grid(self.width, self.height, spec.tile_size, spec.min_tiles, spec.max_tiles)

    def num_tiles(self, spec: TileSpec) -> int:
        cols, rows = self.grid(spec)
        return cols * rows + (1 if spec.thumbnail and cols * rows > 1 else 0)


@dataclass
class TiledImage:
    pixel_values: torch.Tensor  # [n_tiles, 3, T, T] float32, normalised
    grid: tuple[int, int]  # (cols, rows)

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


class ImagePipeline(Protocol):
    spec: TileSpec

    def process(self, paths: list[Path]) -> list[TiledImage | DataError]:
        """One result per path, in order: the tiles, or the DataError that makes that image unusable."""
        ...


def probe(path: Path, max_pixels: int) -> ImageInfo:
    """Read the header only. Raises DataError (missing / empty / corrupt / too large / unsupported mode)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError("missing_image", f"image {path} does not exist") from None
    if size == 0:
        raise DataError("empty_image", f"image {path} is an empty file")
    try:
        with Image.open(path) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format or "?"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError("corrupt_image", f"image {path} cannot be read ({e})") from None
    except Image.DecompressionBombError as e:
        raise DataError("image_too_large", f"image {path}: {e}") from None
    if width < 1 or height < 1:
        raise DataError("corrupt_image", f"image {path} has size {width}x{height}")
    if width * height > max_pixels:
        raise DataError(
            "image_too_large",
            f"image {path} is {width}x{height} = {width * height} pixels > data.max_image_pixels={max_pixels}; "
            "downscale it or raise the limit",
        )
    if mode not in PLAIN_MODES and mode not in SIXTEEN_BIT_MODES:
        raise DataError("unsupported_image_mode", f"image {path} has PIL mode {mode}; convert it to RGB")
    return ImageInfo(path, width, height, mode, fmt)


def check_structure(data: bytes, info: ImageInfo) -> None:
    """Cheap whole-file checks, before any decoder. Some decoders fill a cut file with grey, or decode a damaged
    PNG, instead of failing; this keeps both pipelines from training on such images. Bytes after the image's
    end (JPEG's EOI, PNG's IEND) are allowed, as every decoder ignores them.
    - JPEG: an end-of-image marker (FFD9) after the last start-of-scan (FFDA); inside the entropy-coded data
      0xFF is always followed by 0x00 or a restart marker, so an FFD9 there is the real end.
    - PNG: the chunks up to IEND are all there and each matches its CRC-32 (what libpng checks)."""
    if info.format == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise DataError("truncated_image", f"image {info.path} is a truncated JPEG (no end-of-image marker)")
    if info.format == "PNG":
        _check_png_chunks(data, info.path)


def _check_png_chunks(data: bytes, path: Path) -> None:
    pos = 8  # after the signature
    while True:
        if pos + 12 > len(data):
            raise DataError("truncated_image", f"image {path} is a truncated PNG (no IEND chunk)")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise DataError("truncated_image", f"image {path} is a truncated PNG (chunk {kind!r} is cut)")
        if zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            name = kind.decode("latin-1")
            raise DataError("corrupt_image", f"image {path}: PNG chunk {name} at byte {pos} fails its CRC (damaged file)")
        if kind == b"IEND":
            return
        pos = end + 4


def check_decodes(data: bytes, info: ImageInfo) -> None:
    """For a pipeline whose decoder does not fail on damaged data (DALI's), the decision PIL's decoder takes:
    a JPEG is entropy-decoded by libjpeg at 1/8 scale (draft mode: every coefficient is read, the IDCT is
    cheap; on 600 corrupted JPEGs it rejected exactly the files a full decode rejects), other formats are
    decoded in full. PNGs need nothing more than check_structure (libpng fails where PIL does)."""
    if info.format == "PNG":
        return
    try:
        img = Image.open(io.BytesIO(data))
        if info.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError("corrupt_image", f"image {info.path} fails to decode ({e})") from None


def decode_rgb(data: bytes, info: ImageInfo) -> Image.Image:
    """Full decode to 8-bit RGB. 16-bit greyscale is scaled (v/257), not clipped as PIL's convert would."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError("corrupt_image", f"image {info.path} fails to decode ({e})") from None
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max(initial=0) > 255 or img.mode != "I" else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * 255.0 / scale), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_checked(path: Path, spec: TileSpec) -> tuple[bytes, ImageInfo]:
    """Header probe, read, structure check: what both pipelines do before decoding."""
    info = probe(path, spec.max_pixels)
    data = path.read_bytes()
    check_structure(data, info)
    return data, info


def normalise(chw_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised with ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (chw_uint8.float() / 255.0 - mean) / std


def grid_to_tiles(full: torch.Tensor, cols: int, rows: int, tile: int) -> torch.Tensor:
    """[3, rows*T, cols*T] -> [rows*cols, 3, T, T], tiles in row-major order (InternVL's crop order)."""
    tiles = full.view(3, rows, tile, cols, tile)  # (C, rows, T, cols, T)
    return tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
