"""Tiny random HF checkpoints for conversion tests, built offline with transformers.

Every parameter is re-drawn at random after construction (transformers initialises norms to 1, biases,
CLS and positions to 0, which would hide a swapped or dropped mapping). The InternVL-chat layout has
no transformers class, so `write_chat_layout` spells its key names and config.json out by hand from a
native checkpoint (InternVL's `modeling_intern_vit.py` / `modeling_internvl_chat.py` naming), which
keeps it independent of `engine.checkpoint.keymap`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

IMG = "<IMG_CONTEXT>"


def write_tokenizer(out: Path, vocab_size: int, image_token_id: int | None, salt: str = "t") -> None:
    """A word-level tokenizer whose ids cover the vocab; `salt` changes the token strings (a 'different' tokenizer)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"{salt}{i}": i for i in range(vocab_size)}
    if image_token_id is not None:
        del vocab[f"{salt}{image_token_id}"]
        vocab[IMG] = image_token_id
    tok = Tokenizer(WordLevel(vocab, unk_token=f"{salt}0"))
    tok.pre_tokenizer = Whitespace()
    if image_token_id is not None:
        tok.add_special_tokens([AddedToken(IMG, special=True)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            base = 1.0 if name.endswith(("norm.weight", "layernorm_before.weight", "layernorm_after.weight",
                                         "input_layernorm.weight", "post_attention_layernorm.weight")) else 0.0
            p.copy_((base + 0.08 * noise).to(p.dtype))  # 0.08: logits of O(1), softmax not saturated


def llm_config(vocab=301, hidden=64, layers=2, heads=4, kv_heads=2, tied=False, max_pos=512, rope_scaling=None):
    """max_pos 512: >= 256 image tokens of a default 448px tile + text (engine config validation).
    rope_scaling: e.g. {"rope_type": "dynamic", "factor": 2.0} (InternVL3's llm_config)."""
    from transformers import Qwen2Config

    rope = {"rope_theta": 10000.0, **(rope_scaling or {"rope_type": "default"})}
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                       rope_parameters=rope, tie_word_embeddings=tied)


def make_qwen2(out, *, seed=0, dtype=torch.float32, salt="t", image_token_id=None, **kw) -> Path:
    from transformers import Qwen2ForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    cfg = llm_config(**kw)
    model = Qwen2ForCausalLM(cfg)
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out)
    write_tokenizer(out, cfg.vocab_size, image_token_id, salt)
    return out


def make_internvl(out, *, seed=0, dtype=torch.float32, vit_layers=2, vit_hidden=64, vit_heads=4, qk_norm=False,
                  norm_type="layer_norm", qkv_bias=False, select=-1, salt="t", **llm_kw) -> Path:
    """transformers-native InternVL; image 56 px, patch 14 -> 16 patches -> 4 tokens per tile."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    out = Path(out)
    torch.manual_seed(seed)
    text = llm_config(**llm_kw)
    image_token_id = text.vocab_size - 2  # inside the vocab, not the last id (catches off-by-one trimming)
    vision = InternVLVisionConfig(hidden_size=vit_hidden, intermediate_size=2 * vit_hidden, num_hidden_layers=vit_layers,
                                  num_attention_heads=vit_heads, image_size=56, patch_size=14, use_qk_norm=qk_norm,
                                  norm_type=norm_type, attention_bias=qkv_bias)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=select,
                         tie_word_embeddings=text.tie_word_embeddings)
    model = InternVLForConditionalGeneration(cfg)
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out)
    write_tokenizer(out, text.vocab_size, image_token_id, salt)
    return out


def write_chat_layout(native_dir, out, arch: str = "InternVLChatModel") -> Path:
    """Re-spell a native InternVL checkpoint in the InternVL-chat / Skywork-R1V layout."""
    native_dir, out = Path(native_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((native_dir / "config.json").read_text())
    with safe_open(str(native_dir / "model.safetensors"), "pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}
    dst = {}
    ren_vision = {"embeddings.cls_token": "embeddings.class_embedding",
                  "embeddings.position_embeddings": "embeddings.position_embedding",
                  "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
                  "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias"}
    ren_layer = {"layernorm_before": "norm1", "layernorm_after": "norm2", "lambda_1": "ls1", "lambda_2": "ls2",
                 "attention.projection_layer": "attn.proj", "attention.q_norm": "attn.q_norm",
                 "attention.k_norm": "attn.k_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, t in src.items():
        if k.startswith("language_model."):
            dst[k] = t  # language_model.model.* / language_model.lm_head.weight: same in both layouts
        elif k.startswith("multi_modal_projector."):
            rest = k[len("multi_modal_projector."):]
            idx = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}[rest.split(".")[0]]
            dst[f"mlp1.{idx}.{rest.split('.', 1)[1]}"] = t
        elif k.startswith("vision_tower.embeddings."):
            dst["vision_model." + ren_vision[k[len("vision_tower."):]]] = t
        elif k.startswith("vision_tower.encoder.layer."):
            i, rest = k[len("vision_tower.encoder.layer."):].split(".", 1)
            if rest.startswith(("attention.q_proj", "attention.k_proj", "attention.v_proj")):
                if not rest.startswith("attention.q_proj"):
                    continue
                kind = rest.split(".")[-1]  # weight / bias: fused qkv = cat(q, k, v)
                parts = [src[f"vision_tower.encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
                dst[f"vision_model.encoder.layers.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
                continue
            stem, _, kind = rest.rpartition(".")
            if rest in ("lambda_1", "lambda_2"):
                stem, kind = rest, ""
            new = ren_layer[stem] + (f".{kind}" if kind else "")
            dst[f"vision_model.encoder.layers.{i}.{new}"] = t
        else:
            raise KeyError(k)
    save_file(dst, str(out / "model.safetensors"), metadata={"format": "pt"})
    v, text = cfg["vision_config"], cfg["text_config"]
    chat = {
        "architectures": [arch], "model_type": "internvl_chat" if arch == "InternVLChatModel" else "skywork_chat",
        "select_layer": cfg["vision_feature_layer"], "downsample_ratio": cfg["downsample_ratio"], "ps_version": "v2",
        "template": "internvl2_5", "force_image_size": v["image_size"][0], "dtype": cfg.get("dtype", "float32"),
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v["hidden_size"],
            "intermediate_size": v["intermediate_size"], "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"], "image_size": v["image_size"][0],
            "patch_size": v["patch_size"][0], "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"],
            "qk_normalization": v["use_qk_norm"], "qkv_bias": v["attention_bias"], "initializer_factor": 0.1,
            "hidden_act": "gelu", "num_channels": 3,
        },
        "llm_config": {**text, "architectures": ["Qwen2ForCausalLM"],
                       "tie_word_embeddings": cfg.get("tie_word_embeddings", False)},
    }
    (out / "config.json").write_text(json.dumps(chat, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # chat layout: image token id from the tokenizer
        (out / name).write_bytes((native_dir / name).read_bytes())
    return out
