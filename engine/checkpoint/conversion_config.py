"""The engine Config a conversion builds its models from (shared by `convert` and `mcore_io`).

Its own module so that `mcore_io` (dist checkpoint reading) and `convert` (which uses `mcore_io`) do
not import each other.
"""

from __future__ import annotations

import copy
import math

from engine.checkpoint.hf_io import CheckpointError
from engine.config.base import ConfigError, from_dict, validate_tree


def pad_vit_heads(vision: dict, tp: int) -> None:
    """Give `vision` (a model.vision mapping) all-zero extra heads when TP does not divide its heads.

    e.g. InternViT-6B's 25 heads at TP=8: padded to a multiple of lcm(tp, 8) (= 32), so the checkpoint also
    loads at TP = 1, 2, 4, 8 without re-padding; exports drop them again. A set `padded_num_heads` is kept.
    """
    if vision and not vision.get("padded_num_heads") and vision.get("num_attention_heads", 1) % tp:
        step = math.lcm(tp, 8)
        vision["padded_num_heads"] = -(-vision["num_attention_heads"] // step) * step


def engine_config(model_dict: dict, tp: int = 1, pp: int = 1):
    """A full, validated engine Config around a model config, for building models to convert/check."""
    from engine.config import Config

    md = copy.deepcopy(model_dict)
    # Conversion uses megatron's local spec: its parameter names are the keymap's. The dist checkpoint
    # keys are the same under Transformer Engine (megatron maps local norms to TE's fused names).
    md["transformer_impl"] = "local"
    pad_vit_heads(md.get("vision"), tp)
    max_pos = md.get("llm", {}).get("max_position_embeddings", 32768)
    image_size = md.get("vision", {}).get("image_size", 448)
    data = {"model": md, "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "data": {"tile_size": image_size, "max_tiles": 1, "thumbnail": False},
            "train": {"seq_length": max_pos}, "rollout": {"max_model_len": max_pos}}
    try:
        cfg = from_dict(Config, data)
        validate_tree(cfg)
    except ConfigError as e:
        raise CheckpointError(f"the converted model config is not valid here: {e}") from None
    return cfg


__all__ = ["engine_config", "pad_vit_heads"]
