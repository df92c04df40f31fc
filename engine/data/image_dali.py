"""NVIDIA DALI implementation of InternVL dynamic tiling (same contract as `PilImagePipeline`).

Per image the host reads the header (shared `probe`), picks the grid with the shared InternVL rule and
checks the file's structure and, for formats DALI decodes itself, that PIL's decoder accepts it (shared
`check_decodes`: DALI's CPU decoder turns damaged JPEG data into garbage instead of failing). DALI then
decodes ("mixed" = nvJPEG on a GPU, host decoder on CPU), resizes to (cols*T, rows*T) and to the T x T
thumbnail with a cubic, antialiased filter, and normalises to float CHW. Cutting the resized image into tiles is a view/permute in torch.

Files whose pixel mode DALI does not decode like PIL (CMYK, 16-bit, palette, alpha, bilevel) are
converted once on the host with the shared `decode_rgb` and handed to DALI as lossless PNG, so both
pipelines see the same RGB pixels. A batch that fails inside DALI is retried image by image on a
fresh pipeline, so one bad file is reported as that file's DataError.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from engine.data.errors import DataError
from engine.data.image_common import (IMAGENET_MEAN, IMAGENET_STD, TiledImage, TileSpec, check_decodes, decode_rgb,
                                      grid_to_tiles, read_checked)

# DALI decodes these natively with the same result as PIL's convert("RGB") (checked in the parity test).
NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L"), ("BMP", "RGB")}
MAX_BATCH = 32  # images per DALI run; bigger batches only raise the pinned memory DALI holds
CPU_THREADS = 2  # this CI machine has 2 cores; on a GPU node the decode runs on the GPU anyway


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.dali_device=gpu but CUDA is not available; use dali_device=cpu or auto")
    return device


class DaliImagePipeline:
    name = "dali"

    def __init__(self, spec: TileSpec, device: str = "auto", num_threads: int = CPU_THREADS):
        import nvidia.dali  # noqa: F401  (fail here, with the import error, if DALI is not installed)

        self.spec = spec
        self.device = _resolve_device(device)
        self.num_threads = num_threads
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        t = float(self.spec.tile_size)
        mean = [m * 255.0 for m in IMAGENET_MEAN]
        std = [s * 255.0 for s in IMAGENET_STD]

        @pipeline_def
        def tiling():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            out_w = fn.external_source(name="out_w", dtype=types.FLOAT)
            out_h = fn.external_source(name="out_h", dtype=types.FLOAT)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            resize = dict(interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
            full = fn.resize(images, resize_x=out_w, resize_y=out_h, **resize)
            thumb = fn.resize(images, resize_x=t, resize_y=t, **resize)
            norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            return fn.crop_mirror_normalize(full, **norm), fn.crop_mirror_normalize(thumb, **norm)

        device_id = torch.cuda.current_device() if gpu else None
        # prefetch_queue_depth=1: inputs are fed per call (external_source), nothing to prefetch ahead
        pipe = tiling(batch_size=MAX_BATCH, num_threads=self.num_threads, device_id=device_id, prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _run(self, items: list[tuple[np.ndarray, int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [e for e, _, _ in items])
        self._pipe.feed_input("out_w", [np.array(w, dtype=np.float32) for _, w, _ in items])
        self._pipe.feed_input("out_h", [np.array(h, dtype=np.float32) for _, _, h in items])
        full, thumb = self._pipe.run()
        if self.device == "gpu":
            full, thumb = full.as_cpu(), thumb.as_cpu()
        return [(torch.from_numpy(np.array(full.at(i))), torch.from_numpy(np.array(thumb.at(i)))) for i in range(len(items))]

    def _prepare(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        data, info = read_checked(path, self.spec)
        if (info.format, info.mode) not in NATIVE:
            buf = io.BytesIO()
            decode_rgb(data, info).save(buf, format="PNG", compress_level=1)  # lossless hand-over to DALI
            data = buf.getvalue()
        else:
            check_decodes(data, info)  # DALI's host decoder turns damaged JPEG data into garbage pixels
        return np.frombuffer(data, dtype=np.uint8), info.grid(self.spec)

    def _assemble(self, full: torch.Tensor, thumb: torch.Tensor, grid: tuple[int, int]) -> TiledImage:
        cols, rows = grid
        tiles = grid_to_tiles(full.contiguous(), cols, rows, self.spec.tile_size)
        if self.spec.thumbnail and cols * rows > 1:
            tiles = torch.cat([tiles, thumb[None]], dim=0)
        return TiledImage(tiles, grid)

    def _run_checked(self, batch: list[tuple[int, np.ndarray, tuple[int, int]]], paths, out) -> None:
        t = self.spec.tile_size
        items = [(enc, grid[0] * t, grid[1] * t) for _, enc, grid in batch]
        try:
            results = self._run(items)
        except RuntimeError as e:
            self._pipe = None  # a failed run can leave the pipeline unusable: rebuild it
            if len(batch) == 1:
                k = batch[0][0]
                out[k] = DataError("corrupt_image", f"image {paths[k]} fails to decode in DALI ({str(e)[:200]})")
                return
            for one in batch:  # find the bad file(s)
                self._run_checked([one], paths, out)
            return
        for (k, _, grid), (full, thumb) in zip(batch, results):
            out[k] = self._assemble(full, thumb, grid)

    def process(self, paths: list[Path]) -> list[TiledImage | DataError]:
        out: list[TiledImage | DataError | None] = [None] * len(paths)
        ready = []
        for k, p in enumerate(paths):
            try:
                enc, grid = self._prepare(p)
                ready.append((k, enc, grid))
            except DataError as e:
                out[k] = e
        for start in range(0, len(ready), MAX_BATCH):
            self._run_checked(ready[start : start + MAX_BATCH], paths, out)
        return out  # type: ignore[return-value]
