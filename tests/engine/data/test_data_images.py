"""Image pipelines: DALI (CPU decoder here) vs the PIL reference, and every bad-image case.

Parity bound (stated in docs/data.md): same tile counts and grids; pixel difference on the 0..255
scale: smooth images max <= 2 levels; drawn images with hard edges (the generated set) mean <= 0.5
levels, max <= 24 levels, at most 0.1% of values more than 8 levels apart (cubic filters differ at edges).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.errors import DataError
from engine.data.images import IMAGENET_MEAN, IMAGENET_STD, TileSpec, build_image_pipeline

PIPELINES = ["pil", "dali"]
STD255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def smooth(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 1, w)[None, :, None] * np.ones((h, 1, 1))
    y = np.linspace(0, 1, h)[:, None, None] * np.ones((1, w, 1))
    return Image.fromarray((np.concatenate([x, y, x * y], axis=2) * 255).astype(np.uint8))


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in 0..255 pixel levels (undoing the std normalisation)."""
    return (a - b).abs() * STD255


def pixel_of(tiled, value_rgb=None) -> torch.Tensor:
    """De-normalised 0..255 values of a TiledImage."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    return tiled.pixel_values * STD255 + mean


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    out = {}

    def save(name, img, **kw):
        out[name] = d / name
        img.save(out[name], **kw)

    save("rgb.jpg", smooth(150, 100), quality=95)
    save("rgb.png", smooth(90, 160))
    save("gray.png", smooth(120, 60).convert("L"))
    save("gray.jpg", smooth(60, 120).convert("L"), quality=95)
    save("cmyk.jpg", smooth(100, 100).convert("CMYK"), quality=95)
    save("rgba.png", smooth(80, 50).convert("RGBA"))
    save("palette.png", smooth(70, 70).convert("P"))
    save("tiny.png", Image.new("RGB", (1, 1), (200, 10, 30)))
    save("huge.png", Image.new("RGB", (20000, 100), (10, 200, 30)))
    save("sixteen.png", Image.fromarray(np.full((40, 60), 128 * 257, dtype=np.uint16)))  # 16-bit grey = level 128
    good_jpg = out["rgb.jpg"].read_bytes()
    good_png = out["rgb.png"].read_bytes()
    for name, data in {
        "empty.jpg": b"",
        "garbage.jpg": bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "truncated.png": good_png[: len(good_png) // 2],
        # header and IEND intact, compressed pixel data destroyed: only a decoder can notice
        "broken_idat.png": good_png[:100] + bytes(len(good_png) - 112) + good_png[-12:],
    }.items():
        out[name] = d / name
        out[name].write_bytes(data)
    out["missing.png"] = d / "missing.png"
    return out


SPEC = TileSpec(tile_size=28, min_tiles=1, max_tiles=12, thumbnail=True)


@pytest.mark.parametrize("kind", PIPELINES)
@pytest.mark.parametrize(
    "name,reason",
    [("empty.jpg", "empty_image"), ("garbage.jpg", "corrupt_image"), ("truncated.jpg", "truncated_image"),
     ("truncated.png", "truncated_image"), ("broken_idat.png", "corrupt_image"), ("missing.png", "missing_image")],
)
def test_bad_images_are_reported(images, kind, name, reason):
    pipe = build_image_pipeline(kind, SPEC, "cpu")
    # a bad file in the middle of a batch: only it fails, its neighbours are fine
    res = pipe.process([images["rgb.jpg"], images[name], images["rgb.png"]])
    assert isinstance(res[1], DataError), res[1]
    assert res[1].reason == reason and str(images[name]) in str(res[1])
    assert not isinstance(res[0], DataError) and not isinstance(res[2], DataError)


@pytest.mark.parametrize("kind", PIPELINES)
def test_too_many_pixels_is_an_error(images, kind):
    pipe = build_image_pipeline(kind, TileSpec(28, 1, 12, True, max_pixels=1_000_000), "cpu")
    (res,) = pipe.process([images["huge.png"]])
    assert isinstance(res, DataError) and res.reason == "image_too_large"


@pytest.mark.parametrize("kind", PIPELINES)
def test_odd_images_are_converted(images, kind):
    pipe = build_image_pipeline(kind, SPEC, "cpu")
    names = ["gray.png", "gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "tiny.png", "huge.png", "sixteen.png"]
    res = dict(zip(names, pipe.process([images[n] for n in names])))
    for name, r in res.items():
        assert not isinstance(r, DataError), f"{name}: {r}"
        assert r.pixel_values.dtype == torch.float32 and r.pixel_values.shape[1:] == (3, 28, 28), name
        assert torch.isfinite(r.pixel_values).all()
    assert res["huge.png"].grid == (12, 1) and res["huge.png"].num_tiles == 13  # 12 tiles + thumbnail
    assert res["tiny.png"].grid == (1, 1) and res["tiny.png"].num_tiles == 1
    tiny = pixel_of(res["tiny.png"])
    assert torch.allclose(tiny, torch.tensor([200.0, 10.0, 30.0]).view(1, 3, 1, 1).expand_as(tiny), atol=1.0)
    gray = pixel_of(res["gray.png"])
    assert (gray[:, 0] - gray[:, 1]).abs().max() < 1e-3 and (gray[:, 1] - gray[:, 2]).abs().max() < 1e-3
    sixteen = pixel_of(res["sixteen.png"])  # 16-bit scaled to 8-bit, not clipped to white
    assert (sixteen - 128).abs().max() < 1.0
    huge = pixel_of(res["huge.png"])
    assert (huge - torch.tensor([10.0, 200.0, 30.0]).view(1, 3, 1, 1)).abs().max() < 1.0


def test_dali_matches_pil(images, demo_dir):
    pil = build_image_pipeline("pil", SPEC, "cpu")
    dali = build_image_pipeline("dali", SPEC, "cpu")
    plain = ["rgb.jpg", "rgb.png", "gray.png", "gray.jpg", "cmyk.jpg", "rgba.png", "tiny.png", "sixteen.png"]
    for name, a, b in zip(plain, pil.process([images[n] for n in plain]), dali.process([images[n] for n in plain])):
        assert a.grid == b.grid and a.pixel_values.shape == b.pixel_values.shape, name
        assert levels(a.pixel_values, b.pixel_values).max() <= 2.0, name
    # hard edges: the generated set at real tile size, and a dithered palette image
    spec448 = TileSpec(448, 1, 4, True)
    pil448, dali448 = build_image_pipeline("pil", spec448), build_image_pipeline("dali", spec448, "cpu")
    edged = [(p, pil448, dali448) for p in sorted((demo_dir / "images").glob("*.png"))[:10]]
    edged.append((images["palette.png"], pil, dali))
    for path, p, q in edged:
        (a,), (b,) = p.process([path]), q.process([path])
        assert a.grid == b.grid and a.pixel_values.shape == b.pixel_values.shape, path
        d = levels(a.pixel_values, b.pixel_values)
        assert d.mean() <= 0.5 and d.max() <= 24 and (d > 8).float().mean() <= 1e-3, (path, d.mean(), d.max())


@pytest.mark.parametrize("kind", PIPELINES)
def test_tiles_are_the_resized_image_in_row_major_order(kind, tmp_path):
    # A 2x1 grid of two flat colours: tile 0 = left colour, tile 1 = right colour, then the thumbnail.
    img = Image.new("RGB", (112, 56), (255, 0, 0))
    img.paste((0, 0, 255), (56, 0, 112, 56))
    path = tmp_path / "two.png"
    img.save(path)
    (res,) = build_image_pipeline(kind, TileSpec(28, 1, 4, True), "cpu").process([path])
    assert res.grid == (2, 1) and res.num_tiles == 3
    px = pixel_of(res)
    assert (px[0, :, 4:-4, 4:-4] - torch.tensor([255.0, 0, 0]).view(3, 1, 1)).abs().max() < 1.0
    assert (px[1, :, 4:-4, 4:-4] - torch.tensor([0.0, 0, 255]).view(3, 1, 1)).abs().max() < 1.0


# ------------------------------------------------------------------ corrupted files: the same decision in both
def _corrupt(data: bytes, kind: int, rng) -> bytes:
    """One damage of five kinds, in the second half of the file (past the header), end marker kept."""
    b, n = bytearray(data), len(data)
    if kind == 0:  # bytes flipped
        for pos in rng.integers(n // 4, n - 20, 10):
            b[pos] ^= 0xFF
    elif kind == 1:  # a block zeroed
        s = int(rng.integers(n // 4, n // 2))
        b[s : s + 1024] = bytes(len(b[s : s + 1024]))
    elif kind == 2:  # a block of random bytes
        s = int(rng.integers(n // 4, n // 2))
        b[s : s + 512] = rng.integers(0, 256, len(b[s : s + 512]), dtype=np.uint8).tobytes()
    elif kind == 3:  # one bit flipped
        b[int(rng.integers(n // 3, n - 20))] ^= 1 << int(rng.integers(0, 8))
    else:  # 300 bytes cut out of the middle
        s = int(rng.integers(n // 4, n // 2))
        del b[s : s + 300]
    return bytes(b)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corrupted")
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(smooth(200, 150), dtype=np.float64) + rng.normal(0, 20, (150, 200, 3)), 0, 255)
    img = Image.fromarray(noisy.astype(np.uint8))  # noise: a realistic amount of entropy-coded data
    clean = {}
    for ext, kw in (("jpg", {"quality": 90}), ("png", {})):
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if ext == "jpg" else "PNG", **kw)
        clean[ext] = buf.getvalue()
    out = {}
    for ext, data in clean.items():
        for k in range(30 if ext == "jpg" else 15):  # libjpeg fails on fewer kinds of damage than libpng
            out[f"c{k:02d}.{ext}"] = d / f"c{k:02d}.{ext}"
            out[f"c{k:02d}.{ext}"].write_bytes(_corrupt(data, k % 5, rng))
        out[f"clean.{ext}"] = d / f"clean.{ext}"
        out[f"clean.{ext}"].write_bytes(data)
        # valid files with bytes after their end (EOI / IEND): decoders ignore them, so must we
        out[f"trailing.{ext}"] = d / f"trailing.{ext}"
        out[f"trailing.{ext}"].write_bytes(data + b"appended by some tool: not image data" * 8)
    return out


def test_both_pipelines_reject_the_same_corrupted_files(corrupted):
    names = sorted(corrupted)
    verdicts = {}
    for kind in PIPELINES:
        res = build_image_pipeline(kind, SPEC, "cpu").process([corrupted[n] for n in names])
        verdicts[kind] = {n: (r.reason if isinstance(r, DataError) else "ok") for n, r in zip(names, res)}
    assert verdicts["pil"] == verdicts["dali"]
    jpg_rejected = [n for n in names if n.endswith(".jpg") and verdicts["pil"][n] != "ok"]
    png_rejected = [n for n in names if n.endswith(".png") and verdicts["pil"][n] != "ok"]
    assert len(jpg_rejected) >= 3 and len(png_rejected) >= 12, verdicts["pil"]
    for ext in ("jpg", "png"):
        assert verdicts["pil"][f"clean.{ext}"] == verdicts["pil"][f"trailing.{ext}"] == "ok"


def test_dali_alone_would_decode_files_pil_rejects(corrupted):
    """Why DALI needs the shared decode check: its CPU decoder returns pixels for damaged JPEG data."""
    from engine.data.image_common import probe

    dali = build_image_pipeline("dali", SPEC, "cpu")
    pil = build_image_pipeline("pil", SPEC, "cpu")
    rejected = [p for p, r in zip(corrupted.values(), pil.process(list(corrupted.values())))
                if isinstance(r, DataError) and r.reason == "corrupt_image" and p.suffix == ".jpg"]
    t = SPEC.tile_size
    decoded = 0
    for path in rejected:
        cols, rows = probe(path, SPEC.max_pixels).grid(SPEC)
        try:
            dali._run([(np.frombuffer(path.read_bytes(), dtype=np.uint8), cols * t, rows * t)])
            decoded += 1
        except RuntimeError:
            dali._pipe = None
    assert decoded >= 1, "DALI's decoder rejects these by itself now: the shared check may be dropped"


@pytest.mark.parametrize("kind", PIPELINES)
def test_bytes_after_the_end_of_an_image_change_nothing(corrupted, kind):
    pipe = build_image_pipeline(kind, SPEC, "cpu")
    for ext in ("jpg", "png"):
        clean, trailing = pipe.process([corrupted[f"clean.{ext}"], corrupted[f"trailing.{ext}"]])
        assert torch.equal(clean.pixel_values, trailing.pixel_values), ext
