"""Data-path benchmarks, JSON out: image pipeline images/s (DALI vs PIL) and packer speed (native vs Python).

    python tools/bench_data.py [--images DIR] [--num-images 64] [--packer-items 1000000] [--out bench.json]

Images: the generated visual-reasoning set (written to a temporary directory unless --images is given),
each decoded, tiled (InternVL dynamic tiling, 448 tiles, max 12) and normalised, one pass as warm-up.
DALI runs its CPU decoder without a GPU, the "mixed" (GPU) decoder when CUDA is present.
Checks: the per-image cost of the checks both pipelines share before decoding (structure: PNG chunk CRCs,
JPEG end marker) and of PIL's draft-mode decode that DALI's JPEGs pass first, on the same images as PNG
and re-encoded as JPEG (quality 90), next to the DALI pipeline's own time per image.
Packer: first-fit-decreasing of --packer-items lengths (uniform in [64, 4096], seed 0) into 4096-token
rows; the packs of both implementations are compared for equality.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine.data import packing  # noqa: E402
from engine.data.images import TileSpec, build_image_pipeline  # noqa: E402
from engine.data.visual_reasoning import write_demo_set  # noqa: E402


def bench_images(kind: str, paths: list[Path], spec: TileSpec, repeats: int) -> dict:
    pipe = build_image_pipeline(kind, spec, "auto")
    pipe.process(paths[: min(8, len(paths))])  # warm-up (DALI builds its pipeline here)
    batch = 16  # images per process() call, like a micro-batch of single-image samples
    tiles = 0
    start = time.perf_counter()
    for _ in range(repeats):
        for s in range(0, len(paths), batch):
            for res in pipe.process(paths[s : s + batch]):
                tiles += res.num_tiles
    dt = time.perf_counter() - start
    n = len(paths) * repeats
    device = getattr(pipe, "device", "cpu")
    return {"impl": kind, "device": device, "images": n, "tiles": tiles, "seconds": round(dt, 3),
            "images_per_s": round(n / dt, 1), "tiles_per_s": round(tiles / dt, 1)}


def bench_checks(paths: list[Path], spec: TileSpec, repeats: int, tmp: Path) -> list[dict]:
    from engine.data.image_common import check_decodes, read_checked

    rows = []
    for fmt in ("png", "jpg"):
        files = paths
        if fmt == "jpg":  # the same pictures as JPEGs, where the decode check applies
            files = [tmp / f"bench_{k:05d}.jpg" for k in range(len(paths))]
            for p, q in zip(paths, files):
                Image.open(p).convert("RGB").save(q, quality=90)
        loaded = [read_checked(p, spec) for p in files]  # warm the page cache
        start = time.perf_counter()
        for _ in range(repeats):
            for p in files:
                read_checked(p, spec)
        structure = (time.perf_counter() - start) / (repeats * len(files))
        start = time.perf_counter()
        for _ in range(repeats):
            for data, info in loaded:
                check_decodes(data, info)
        decode = (time.perf_counter() - start) / (repeats * len(files))
        dali = bench_images("dali", files, spec, repeats)
        rows.append({"format": fmt, "images": len(files), "structure_check_ms": round(structure * 1e3, 3),
                     "decode_check_ms": round(decode * 1e3, 3), "dali_ms_per_image": round(1e3 / dali["images_per_s"], 3),
                     "checks_share_of_dali": round((structure + decode) * dali["images_per_s"], 3)})
    return rows


def bench_packer(n: int, capacity: int) -> list[dict]:
    lengths = np.random.default_rng(0).integers(64, capacity + 1, size=n)
    rows = []
    results = {}
    for impl in ("native", "python"):
        if impl == "native" and not packing.native_available():
            rows.append({"impl": "native", "error": f"not built: {packing.NATIVE_ERROR}"})
            continue
        start = time.perf_counter()
        items, offsets = packing.pack_ffd(lengths, capacity, impl)
        dt = time.perf_counter() - start
        results[impl] = (items, offsets)
        fill = lengths.sum() / (capacity * (len(offsets) - 1))
        rows.append({"impl": impl, "items": n, "capacity": capacity, "rows": len(offsets) - 1, "fill": round(float(fill), 4),
                     "seconds": round(dt, 3), "items_per_s": round(n / dt)})
    if len(results) == 2:
        same = all(np.array_equal(a, b) for a, b in zip(results["native"], results["python"]))
        for r in rows:
            r["identical_packs"] = same
        rows[0]["speedup_vs_python"] = round(rows[1]["seconds"] / rows[0]["seconds"], 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="", help="directory of images (default: generate the demo set)")
    p.add_argument("--num-images", type=int, default=64, help="images to generate when --images is not given")
    p.add_argument("--repeats", type=int, default=2, help="passes over the images")
    p.add_argument("--max-tiles", type=int, default=12, help="data.max_tiles")
    p.add_argument("--packer-items", type=int, default=1_000_000, help="sample lengths to pack")
    p.add_argument("--capacity", type=int, default=4096, help="row length (train.seq_length)")
    p.add_argument("--skip", choices=["images", "packer"], action="append", default=[], help="leave a part out")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    result = {"host": platform.node(), "cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if "images" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(args.images) if args.images else Path(tmp)
            if not args.images:
                write_demo_set(folder, args.num_images, seed=0)
            paths = sorted(q for q in folder.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".jpeg"))
            spec = TileSpec(448, 1, args.max_tiles, True)
            result["images"] = [bench_images(k, paths, spec, args.repeats) for k in ("pil", "dali")]
            with tempfile.TemporaryDirectory() as jpg_dir:
                result["checks"] = bench_checks(paths, spec, args.repeats, Path(jpg_dir))
    if "packer" not in args.skip:
        result["packer"] = bench_packer(args.packer_items, args.capacity)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
