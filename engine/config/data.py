"""Data sub-config (formats, chat template, image pipeline, packing, loading). Owned by engine/data.

The sequence length is `train.seq_length`; tile geometry (patch size, pixel-shuffle ratio, tokens per
tile) and the image token id come from `model`. This section only holds what is about the data itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class DataConfig:
    train_path: str = field_("", "JSONL training file (images are paths relative to it)")
    max_samples: int = field_(0, "use only the first N samples of train_path (0 = all): a small prompt pool, a debug run",
                              bounds="[0, inf)")
    valid_path: str = field_("", "optional JSONL validation file, same format as train_path")
    format: Literal["sft", "preference", "rl"] = field_(
        "sft", "sample format: sft conversations, preference (MPO) pairs, or rl prompts with gold answers"
    )
    tokenizer_path: str = field_("assets/tiny_tokenizer", "local HF tokenizer directory (AutoTokenizer, offline)")
    system_prompt: str = field_("", "system message put before every conversation ('' = none, unless the sample has one)")
    thinking: Literal["think", "no_think"] = field_(
        "think",
        "think: the assistant turn opens with '<think>\\n' (R1V slow thinking); no_think: traces are stripped",
    )
    image_pipeline: Literal["dali", "pil"] = field_("pil", "image decode/tile implementation: NVIDIA DALI or PIL reference")
    dali_device: Literal["auto", "cpu", "gpu"] = field_(
        "auto", "DALI decoder placement: gpu = 'mixed' decoder, cpu = host decoder, auto = gpu when CUDA is present"
    )
    tile_size: int = field_(448, "tile side in pixels; must equal model.vision.image_size", bounds="[1, inf)")
    min_tiles: int = field_(1, "fewest tiles per image in dynamic tiling (InternVL default 1)", bounds="[1, 64]")
    # 64 tiles x 256 tokens = 16k image tokens per image: beyond any recipe we run
    max_tiles: int = field_(12, "most tiles per image in dynamic tiling (InternVL default 12)", bounds="[1, 64]")
    thumbnail: bool = field_(True, "add a whole-image thumbnail tile when an image has more than one tile")
    max_image_pixels: int = field_(
        100_000_000, "images with more pixels are errors (decompression-bomb guard; 20000x5000 = 1e8)",
        bounds="[1, inf)")
    on_error: Literal["raise", "skip"] = field_(
        "raise", "bad sample/image: raise with file:line, or skip it (skips are counted by reason and logged)"
    )
    truncate: bool = field_(
        False, "cut samples longer than train.seq_length (only in text after the last image); false = error"
    )
    packing: bool = field_(True, "pack several samples per row (first-fit-decreasing; preference: both sequences of a "
                                 "pair in one micro-batch of 2 x micro_batch_size rows); false = one sample per row")
    pack_window: int = field_(512, "samples looked at together by the packer (bigger packs tighter, costs memory)",
                              bounds="[1, inf)")
    shuffle: bool = field_(True, "shuffle the sample order each epoch")
    seed: int = field_(1234, "shuffle seed; the order of epoch e uses seed + e", bounds="[0, inf)")
    num_workers: int = field_(0, "DataLoader worker processes that decode images (0 = in the main process)",
                              bounds="[0, inf)")
    prefetch_factor: int = field_(2, "micro-batches each worker prepares ahead (only with num_workers > 0)",
                                  bounds="[1, inf)")

    def validate(self, root) -> None:
        vision = root.model.vision
        if self.tile_size != vision.image_size:
            raise ConfigError(
                f"data.tile_size={self.tile_size} differs from model.vision.image_size={vision.image_size}; "
                "set them equal (tiles are what the vision encoder sees)"
            )
        if self.tile_size % vision.patch_size:
            raise ConfigError(
                f"data.tile_size={self.tile_size} must be a positive multiple of model.vision.patch_size={vision.patch_size}"
            )
        if self.min_tiles > self.max_tiles:
            raise ConfigError(
                f"data.min_tiles={self.min_tiles}, data.max_tiles={self.max_tiles}: need 1 <= min_tiles <= max_tiles"
            )
        if self.format == "rl" and self.packing:
            # RL prompts are generated from, not trained on (GRPO packs its rollout rows itself)
            raise ConfigError("data.packing=true is for data.format=sft or preference (got rl); set data.packing=false")
        if not self.tokenizer_path:
            raise ConfigError("data.tokenizer_path is empty; point it at a local HF tokenizer directory")
        tiles = self.max_tiles + (1 if self.thumbnail and self.max_tiles > 1 else 0)
        image_tokens = tiles * root.model.tokens_per_tile
        if image_tokens + 16 > root.train.seq_length:  # 16: room for the chat tags around one image
            raise ConfigError(
                f"one image may take {tiles} tiles x {root.model.tokens_per_tile} tokens = {image_tokens} tokens, "
                f"which does not fit train.seq_length={root.train.seq_length}; lower data.max_tiles or raise seq_length"
            )
