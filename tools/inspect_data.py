"""Inspect a JSONL data file through the training code path (parse, template, tiling, image decode).

    python tools/inspect_data.py --data data/generated/sft.jsonl [--config R.yaml] [--min-tiles M]
                                 [--max-tiles N] [--format sft|preference|rl] [--set key=value ...] [--json]

Per sample: id, status (ok | error | skipped: "skipped" when data.on_error=skip), error, tiles per
image (thumbnail included), image tokens, total tokens, truncated; then a summary. With --json: one
JSON object per line with keys id, status, error, tiles, image_tokens, tokens, truncated, then one
{"summary": {...}} object. Exit status 0 (the report is the result), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, load_config  # noqa: E402
from engine.data.dataset import load_images  # noqa: E402
from engine.data.errors import DataError  # noqa: E402
from engine.data.loader import build_data_context  # noqa: E402


def inspect(ctx, pipeline, i: int, on_error: str) -> dict:
    src = ctx.planner.source
    rec = {"id": None, "status": "ok", "error": None, "tiles": [], "image_tokens": 0, "tokens": 0, "truncated": False}
    rec["id"] = src.index.where(i)
    try:
        raw_id = src.index.read(i).get("id")  # the sample's own id even when it fails validation
        rec["id"] = rec["id"] if raw_id is None else str(raw_id)
    except DataError:
        pass  # not JSON: file:line is its id
    try:
        planned = ctx.planner.plan(i)
        rec["id"] = planned.id
        loaded = load_images(planned, pipeline)
        rec["tiles"] = list(planned.tiles)
        rec["image_tokens"] = int(loaded.pixel_values.shape[0]) * ctx.tokens_per_tile
        rec["tokens"] = len(planned) if planned.rejected is None else max(len(planned), len(planned.rejected))
        rec["truncated"] = bool(planned.truncated)
    except DataError as e:
        rec.update(status="skipped" if on_error == "skip" else "error", error=str(e), reason=e.reason)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSONL file to inspect")
    p.add_argument("--config", default=None, help="recipe YAML (data/model/train sections are used)")
    p.add_argument("--format", default=None, choices=["sft", "preference", "rl"], help="default: data.format")
    p.add_argument("--min-tiles", type=int, default=None, help="override data.min_tiles")
    p.add_argument("--max-tiles", type=int, default=None, help="override data.max_tiles")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = p.parse_args(argv)
    overrides = list(args.set)
    if args.min_tiles is not None:
        overrides.append(f"data.min_tiles={args.min_tiles}")
    if args.max_tiles is not None:
        overrides.append(f"data.max_tiles={args.max_tiles}")
    if args.format and args.format != "sft":
        overrides += [f"data.format={args.format}", "data.packing=false"]
    try:
        cfg = load_config(args.config, overrides)
        ctx = build_data_context(cfg, args.data, args.format, check_model=False)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"inspect_data: {e}", file=sys.stderr)
        return 2
    pipeline = ctx.make_pipeline()
    status, reasons = Counter(), Counter()
    totals = Counter()
    if not args.json:
        print(f"{'id':<24} {'status':<8} {'images':>6} {'tiles':<16} {'img_tok':>8} {'tokens':>7} trunc  error")
    for i in range(len(ctx.planner.source)):
        rec = inspect(ctx, pipeline, i, cfg.data.on_error)
        status[rec["status"]] += 1
        if rec["status"] != "ok":
            reasons[rec.pop("reason")] += 1
        else:
            totals["tokens"] += rec["tokens"]
            totals["image_tokens"] += rec["image_tokens"]
            totals["tiles"] += sum(rec["tiles"])
            totals["images"] += len(rec["tiles"])
            totals["truncated"] += int(rec["truncated"])
        if args.json:
            print(json.dumps(rec))
        else:
            print(f"{str(rec['id'])[:24]:<24} {rec['status']:<8} {len(rec['tiles']):>6} {str(rec['tiles'])[:16]:<16} "
                  f"{rec['image_tokens']:>8} {rec['tokens']:>7} {'yes' if rec['truncated'] else 'no':<6} {rec['error'] or ''}")
    summary = {
        "file": args.data, "format": ctx.planner.source.fmt, "samples": sum(status.values()),
        "ok": status["ok"], "error": status["error"], "skipped": status["skipped"], "reasons": dict(sorted(reasons.items())),
        "images": totals["images"], "tiles": totals["tiles"], "image_tokens": totals["image_tokens"],
        "tokens": totals["tokens"], "truncated": totals["truncated"], "seq_length": ctx.seq_length,
        "tokens_per_tile": ctx.tokens_per_tile, "image_pipeline": ctx.image_pipeline,
    }
    print(json.dumps({"summary": summary}) if args.json else "summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
