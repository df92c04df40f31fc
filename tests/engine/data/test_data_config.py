"""data: config section validation (messages say what to change)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config


def test_defaults_are_valid():
    cfg = load_config(None, [])
    assert (cfg.data.tile_size, cfg.data.min_tiles, cfg.data.max_tiles, cfg.data.thumbnail) == (448, 1, 12, True)
    assert cfg.data.on_error == "raise" and cfg.data.image_pipeline in ("dali", "pil")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.tile_size=224"], "model.vision.image_size"),
        (["data.min_tiles=3", "data.max_tiles=2"], "min_tiles <= max_tiles"),
        (["data.min_tiles=0"], r"data.min_tiles=0 is outside the allowed range \[1, 64\]"),
        (["data.max_tiles=65"], r"data.max_tiles=65 is outside the allowed range \[1, 64\]"),
        (["data.format=rl"], "set data.packing=false"),
        (["data.max_tiles=20"], "lower data.max_tiles or raise seq_length"),
        (["data.image_pipeline=opencv"], "not one of"),
        (["data.on_error=ignore"], "not one of"),
        (["data.pack_window=0"], "pack_window"),
        (["data.tokenizer_path="], "tokenizer_path"),
        (["data.num_worker=2"], "Did you mean 'num_workers'"),
    ],
)
def test_invalid_values_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
