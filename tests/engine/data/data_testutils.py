"""Test helpers for tests/engine/data: a root Config with small tiles (fast on 2 CPU cores), JSONL writing."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import load_config

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "assets" / "tiny_tokenizer"
TINY_IMAGE_TOKEN_ID = 5  # id of <IMG_CONTEXT> in assets/tiny_tokenizer (checked in test_data_template.py)

def tiny_config(*extra: str, **data):
    """28-pixel tiles: 2x2 patches of 14, pixel shuffle 0.5 -> 1 token per tile; 512-token rows.
    `extra`: more `key=value` overrides; `data`: data.* values."""
    overrides = [
        "model.vision.image_size=28", "data.tile_size=28", "model.image_token_id=5", "model.llm.vocab_size=1024",
        "train.seq_length=512", "model.llm.max_position_embeddings=1024", f"data.tokenizer_path={TOKENIZER}",
        "data.max_tiles=6",
    ]
    overrides += [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data.items()]
    overrides += list(extra)
    return load_config(None, overrides)

def write_jsonl(path: Path, rows: list) -> Path:
    """rows: dicts (dumped) or raw strings (written as they are, for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
