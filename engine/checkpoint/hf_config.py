"""HF config.json <-> our ModelConfig, per part (Qwen2 LLM, InternViT in two spellings, connector).

Anything our model cannot represent exactly (a RoPE scaling, sliding windows, a final ViT LayerNorm,
another activation) is refused with the key and the value, never dropped.
"""

from __future__ import annotations

from engine.config.base import ConfigError
from engine.config.model import ModelConfig

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def hf_dtype(cfg: dict) -> str | None:
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return _DTYPES.get(str(d).replace("torch.", "")) if d else None


def _side(v) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


# ------------------------------------------------------------------ LLM (Qwen2) ----------------------


def llm_from_hf(c: dict, where: str) -> dict:
    _need(c.get("hidden_act", "silu") == "silu", where, f"hidden_act={c.get('hidden_act')!r}; only silu (SwiGLU) is supported")
    _need(not c.get("use_sliding_window", False), where, "use_sliding_window=true is not supported; set it false")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _need(rope_type == "default", where, f"RoPE scaling {rope_type!r} is not supported (only the default RoPE)")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    _need(head_dim * heads == c["hidden_size"], where, f"head_dim={head_dim} x heads != hidden_size; not supported")
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads, rope_theta=float(theta),
        max_position_embeddings=c.get("max_position_embeddings", 32768), norm_eps=c.get("rms_norm_eps", 1e-6),
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
        "rope_theta": llm.rope_theta, "rope_parameters": {"rope_theta": llm.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": llm.tie_embeddings, "use_sliding_window": False, "sliding_window": None,
        "attention_dropout": 0.0, "dtype": m.params_dtype, "torch_dtype": m.params_dtype,
    }


# ------------------------------------------------------------------ InternViT ------------------------
# select_layer: HF indexes hidden_states (0 = embeddings, -1 = last block); ours indexes blocks.


def _select_from_hf(h: int, where: str) -> int:
    _need(h != 0, where, "a vision feature layer of 0 (the patch embeddings) is not supported")
    return h if h < 0 else h - 1


def vision_from_native(c: dict, where: str) -> dict:
    _need(c.get("use_mean_pooling", True), where, "use_mean_pooling=false (a final ViT LayerNorm) is not supported")
    _need(c.get("use_absolute_position_embeddings", True), where, "use_absolute_position_embeddings=false is not supported")
    _need(c.get("hidden_act", "gelu") == "gelu", where, f"hidden_act={c.get('hidden_act')!r}; only gelu is supported")
    return dict(
        image_size=_side(c["image_size"]), patch_size=_side(c["patch_size"]), num_channels=c.get("num_channels", 3),
        hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], norm_type=c.get("norm_type", "layer_norm"),
        norm_eps=c.get("layer_norm_eps", 1e-6), qk_norm=c.get("use_qk_norm", False),
        qkv_bias=c.get("attention_bias", False), layer_scale_init=c.get("layer_scale_init_value", 0.1),
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
    _need(c.get("hidden_act", "gelu") == "gelu", where, f"hidden_act={c.get('hidden_act')!r}; only gelu is supported")
    return dict(
        image_size=_side(c["image_size"]), patch_size=_side(c["patch_size"]), num_channels=c.get("num_channels", 3),
        hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], norm_type=c.get("norm_type", "rms_norm"),
        norm_eps=c.get("layer_norm_eps", 1e-6), qk_norm=c.get("qk_normalization", False),
        qkv_bias=c.get("qkv_bias", True), layer_scale_init=c.get("initializer_factor", 0.1),
    )


def vision_to_chat(m: ModelConfig, n_layers: int) -> dict:
    v = m.vision
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
        "intermediate_size": v.ffn_hidden_size, "num_hidden_layers": n_layers,
        "num_attention_heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "norm_type": v.norm_type, "layer_norm_eps": v.norm_eps,
        "qk_normalization": v.qk_norm, "qkv_bias": v.qkv_bias, "initializer_factor": v.layer_scale_init,
        "hidden_act": "gelu", "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
        "use_flash_attn": False, "dtype": m.params_dtype, "torch_dtype": m.params_dtype,
    }


def vision_select_layer(m: ModelConfig) -> tuple[int, int]:
    """(layers written, HF feature layer). Blocks after select_layer are not built, so the exported
    encoder is truncated to them and reads its last block (-1): the same features, fewer weights."""
    return m.vision.select_layer % m.vision.num_layers + 1, -1


__all__ = [
    "hf_dtype", "llm_from_hf", "llm_to_hf", "vision_from_chat", "vision_from_native", "vision_select_layer",
    "vision_to_chat", "vision_to_native", "_select_from_hf", "_need",
]
