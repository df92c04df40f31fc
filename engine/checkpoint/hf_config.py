"""HF config.json <-> our ModelConfig, per part (Qwen2 LLM, InternViT in two spellings, connector).

A key that a config.json leaves out means what the class that reads the file defaults it to, never our
ModelConfig's default: transformers' `Qwen2Config`, `InternVLVisionConfig` and `InternVLConfig`, and for the
chat layout InternVL's own `InternVisionConfig` / `InternVLChatConfig` (shipped with every InternVL-chat and
Skywork-R1V checkpoint). A vision_config without `qk_normalization` is InternViT-6B's qk-normed block, for
instance, not ours without it. Anything our model cannot represent exactly (a RoPE scaling other than dynamic
NTK, sliding windows, a final ViT LayerNorm, another activation, LoRA-wrapped weights, a forced image size
other than the encoder's) is refused with the key and the value, never dropped.
"""

from __future__ import annotations

from engine.config.base import ConfigError
from engine.config.model import ModelConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# transformers 5.x `Qwen2Config.__init__` defaults (tests compare them with the installed transformers).
# A missing num_key_value_heads is 32 there; an explicit null means "as many as the query heads".
QWEN2_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "attention_dropout": 0.0,
}
QWEN2_ROPE_THETA = 10000.0  # Qwen2Config's default base (rope_parameters["rope_theta"])

# transformers `InternVLVisionConfig` / `InternVLConfig` defaults (the native layout; compared by a test too).
# InternVLConfig ties the output layer to the embedding unless its own tie_word_embeddings says otherwise.
INTERNVL_VISION_DEFAULTS = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "attention_bias": False,
    "use_qk_norm": False, "intermediate_size": 4096, "hidden_act": "gelu", "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6, "image_size": [448, 448], "patch_size": [14, 14], "num_channels": 3,
    "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.1, "use_mean_pooling": True,
}
INTERNVL_DEFAULTS = {
    "image_token_id": 151667, "downsample_ratio": 0.5, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default", "tie_word_embeddings": True,
}

# InternVL's `InternVisionConfig.__init__` (OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/
# configuration_intern_vit.py; the InternVL2.5/3 and Skywork-R1V hub copies are the same): InternViT-6B.
INTERN_VIT_DEFAULTS = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "use_flash_attn": True, "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0,
    "drop_path_rate": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 0.1,
}
# InternVL's `InternVLChatConfig.__init__` (configuration_internvl_chat.py beside it; Skywork's
# `SkyworkChatConfig` has the same fields and defaults, without pad2square). Note ps_version 'v1'.
INTERNVL_CHAT_DEFAULTS = {
    "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False, "select_layer": -1, "force_image_size": None,
    "downsample_ratio": 0.5, "template": None, "dynamic_image_size": False, "use_thumbnail": False,
    "ps_version": "v1", "min_dynamic_patch": 1, "max_dynamic_patch": 6,
}


def with_defaults(c: dict, defaults: dict) -> dict:
    """config.json as its class reads it: the class's default for every key the file leaves out."""
    return {**defaults, **c}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def hf_dtype(cfg: dict) -> str | None:
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return _DTYPES.get(str(d).replace("torch.", "")) if d else None


def _side(v) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


# ------------------------------------------------------------------ LLM (Qwen2) ----------------------


def _rope(c: dict, where: str) -> tuple[float, str, float]:
    """(base, scaling type, factor) from transformers 5's rope_parameters or 4.x's rope_theta / rope_scaling."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", c.get("rope_theta") or QWEN2_ROPE_THETA))
    if rope_type == "default":
        return theta, "none", 1.0
    _need(rope_type == "dynamic", where, f"RoPE scaling {rope_type!r} is not supported (only the default RoPE and "
                                         "dynamic NTK)")
    # vLLM reads `max_trained_positions` (a rescaled base at every length) and `alpha` (another formula)
    extra = sorted(set(rope) - {"type", "rope_type", "factor", "rope_theta"})
    _need(not extra, where, f"dynamic RoPE scaling with {extra} is not supported (only a plain `factor`)")
    _need("factor" in rope, where, "dynamic RoPE scaling without a `factor`")
    return theta, "dynamic", float(rope["factor"])


def llm_from_hf(c: dict, where: str) -> dict:
    c = with_defaults(c, QWEN2_DEFAULTS)
    _need(c["hidden_act"] == "silu", where, f"hidden_act={c['hidden_act']!r}; only silu (SwiGLU) is supported")
    _need(not c["use_sliding_window"], where, "use_sliding_window=true is not supported; set it false")
    kinds = sorted(set(c.get("layer_types") or ["full_attention"]))
    _need(kinds == ["full_attention"], where, f"layer_types {kinds}: only full attention is supported")
    theta, scaling, factor = _rope(c, where)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    _need(head_dim * heads == c["hidden_size"], where, f"head_dim={head_dim} x heads != hidden_size; not supported")
    kv = c["num_key_value_heads"]
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=heads if kv is None else kv, rope_theta=theta,
        max_position_embeddings=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
        rope_scaling=scaling, rope_scaling_factor=factor,
        qkv_bias=True,  # Qwen2 always has q/k/v bias
    )


def llm_to_hf(m: ModelConfig) -> dict:
    llm = m.llm
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size, "intermediate_size": llm.ffn_hidden_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_query_groups, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.norm_eps,
        "rope_theta": llm.rope_theta, **_rope_to_hf(llm),
        "tie_word_embeddings": llm.tie_embeddings, "use_sliding_window": False, "sliding_window": None,
        "attention_dropout": 0.0, "dtype": m.params_dtype, "torch_dtype": m.params_dtype,
    }


def _rope_to_hf(llm) -> dict:
    """rope_parameters (transformers 5) and rope_scaling (4.x, vLLM) for the LLM's RoPE."""
    if llm.rope_scaling == "none":
        return {"rope_parameters": {"rope_theta": llm.rope_theta, "rope_type": "default"}}
    scaling = {"rope_type": llm.rope_scaling, "type": llm.rope_scaling, "factor": llm.rope_scaling_factor}
    return {"rope_parameters": {"rope_theta": llm.rope_theta, **scaling}, "rope_scaling": scaling}


# ------------------------------------------------------------------ InternViT ------------------------
# select_layer: HF indexes hidden_states (0 = embeddings, -1 = last block); ours indexes blocks.


def _select_from_hf(h: int, where: str) -> int:
    _need(h != 0, where, "a vision feature layer of 0 (the patch embeddings) is not supported")
    return h if h < 0 else h - 1


def vision_from_native(c: dict, where: str) -> dict:
    c = with_defaults(c, INTERNVL_VISION_DEFAULTS)
    _need(c["use_mean_pooling"], where, "use_mean_pooling=false (a final ViT LayerNorm) is not supported")
    _need(c["use_absolute_position_embeddings"], where, "use_absolute_position_embeddings=false is not supported")
    _need(c["hidden_act"] == "gelu", where, f"hidden_act={c['hidden_act']!r}; only gelu is supported")
    return dict(
        image_size=_side(c["image_size"]), patch_size=_side(c["patch_size"]), num_channels=c["num_channels"],
        hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], norm_type=c["norm_type"], norm_eps=c["layer_norm_eps"],
        qk_norm=c["use_qk_norm"], qkv_bias=c["attention_bias"], layer_scale_init=c["layer_scale_init_value"],
    )


def vision_to_native(m: ModelConfig, n_layers: int) -> dict:
    v = m.vision
    return {
        "model_type": "internvl_vision", "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
        "num_hidden_layers": n_layers, "num_attention_heads": v.num_attention_heads,
        "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
        "num_channels": v.num_channels, "norm_type": v.norm_type, "layer_norm_eps": v.norm_eps,
        "use_qk_norm": v.qk_norm, "attention_bias": v.qkv_bias, "layer_scale_init_value": v.layer_scale_init,
        "hidden_act": "gelu", "use_mean_pooling": True, "use_absolute_position_embeddings": True,
        "use_mask_token": False, "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
    }


def vision_from_chat(c: dict, where: str) -> dict:
    """An InternViT vision_config, read as InternVL's InternVisionConfig reads it (InternViT-6B defaults).

    dropout / drop_path_rate / attention_dropout are the publisher's training settings (the engine trains the
    ViT without them) and use_flash_attn an implementation choice: none changes the weights or the outputs.
    """
    c = with_defaults(c, INTERN_VIT_DEFAULTS)
    _need(c["hidden_act"] == "gelu", where, f"hidden_act={c['hidden_act']!r}; only gelu is supported")
    return dict(
        image_size=_side(c["image_size"]), patch_size=_side(c["patch_size"]), num_channels=c["num_channels"],
        hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], norm_type=c["norm_type"], norm_eps=c["layer_norm_eps"],
        qk_norm=c["qk_normalization"], qkv_bias=c["qkv_bias"], layer_scale_init=c["initializer_factor"],
    )


def vision_to_chat(m: ModelConfig, n_layers: int) -> dict:
    v = m.vision
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
        "intermediate_size": v.ffn_hidden_size, "num_hidden_layers": n_layers,
        "num_attention_heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "norm_type": v.norm_type, "layer_norm_eps": v.norm_eps,
        "qk_normalization": v.qk_norm, "qkv_bias": v.qkv_bias, "initializer_factor": v.layer_scale_init,
        "hidden_act": "gelu", "dtype": m.params_dtype, "torch_dtype": m.params_dtype,
        # dropout / drop_path_rate / attention_dropout / use_flash_attn: the source's survive (base config),
        # else the config class's defaults (0.0, and flash attention where installed)
    }


def vision_select_layer(m: ModelConfig) -> tuple[int, int]:
    """(layers written, HF feature layer). Blocks after select_layer are not built, so the exported
    encoder is truncated to them and reads its last block (-1): the same features, fewer weights."""
    return m.vision.select_layer % m.vision.num_layers + 1, -1


__all__ = [
    "INTERNVL_CHAT_DEFAULTS", "INTERNVL_DEFAULTS", "INTERNVL_VISION_DEFAULTS", "INTERN_VIT_DEFAULTS", "QWEN2_DEFAULTS",
    "with_defaults", "hf_dtype", "llm_from_hf", "llm_to_hf", "vision_from_chat", "vision_from_native",
    "vision_select_layer",
    "vision_to_chat", "vision_to_native", "_select_from_hf", "_need",
]
