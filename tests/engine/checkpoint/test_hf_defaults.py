"""A key config.json leaves out means what the class that reads the file defaults it to (issue 13 item 12a):
transformers' Qwen2Config / InternVLVisionConfig / InternVLConfig, InternVL's InternVisionConfig /
InternVLChatConfig for the chat layout. Also RoPE scaling (12c) and what is refused instead of dropped."""

from __future__ import annotations

import inspect

import pytest

from engine.checkpoint import hf_config as hc
from engine.checkpoint.adapters import ADAPTERS
from engine.config.base import ConfigError

CHAT, NATIVE = ADAPTERS["internvl_chat"], ADAPTERS["internvl"]
QWEN = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
VIT_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)

# InternVL's own classes, as published (OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/
# configuration_intern_vit.py and configuration_internvl_chat.py, `__init__` signatures)
UPSTREAM_VIT = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                    num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                    use_flash_attn=True, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0,
                    drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1)
UPSTREAM_CHAT = dict(use_backbone_lora=0, use_llm_lora=0, pad2square=False, select_layer=-1, force_image_size=None,
                     downsample_ratio=0.5, template=None, dynamic_image_size=False, use_thumbnail=False,
                     ps_version="v1", min_dynamic_patch=1, max_dynamic_patch=6)


def _signature_defaults(cls) -> dict:
    skip = {"self", "kwargs", "vision_config", "text_config"}
    return {k: (list(v.default) if isinstance(v.default, tuple) else v.default)
            for k, v in inspect.signature(cls.__init__).parameters.items() if k not in skip}


def test_default_tables_are_the_classes_defaults():
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    for table, cls in ((hc.QWEN2_DEFAULTS, Qwen2Config), (hc.INTERNVL_VISION_DEFAULTS, InternVLVisionConfig),
                       (hc.INTERNVL_DEFAULTS, InternVLConfig)):
        real = _signature_defaults(cls)
        assert {k: real[k] for k in table} == table, cls.__name__
    assert Qwen2Config().rope_parameters["rope_theta"] == hc.QWEN2_ROPE_THETA
    assert hc.INTERN_VIT_DEFAULTS == UPSTREAM_VIT and hc.INTERNVL_CHAT_DEFAULTS == UPSTREAM_CHAT


def test_our_exported_config_classes_default_like_internvls():
    """The configuration code an export carries defaults every field as InternVL's classes do."""
    from engine.checkpoint.hf_remote_code import DIR

    for file, cls_name, upstream in (("configuration_intern_vit.py", "InternVisionConfig", UPSTREAM_VIT),
                                     ("configuration_internvl_chat.py", "InternVLChatConfig", UPSTREAM_CHAT)):
        tree = __import__("ast").parse((DIR / file).read_text())
        cls = next(n for n in tree.body if getattr(n, "name", None) == cls_name)
        init = next(n for n in cls.body if getattr(n, "name", None) == "__init__")
        names = [a.arg for a in init.args.args[-len(init.args.defaults):]]
        ours = {n: __import__("ast").literal_eval(d) for n, d in zip(names, init.args.defaults)}
        assert {k: ours.get(k, "<missing>") for k in upstream} == upstream, file


def test_a_vision_config_without_qk_normalization_is_internvit_6b_s_block():
    v = hc.vision_from_chat(VIT_SHAPES, "c")  # qk_normalization, qkv_bias, norm_type left out
    assert (v["qk_norm"], v["qkv_bias"], v["norm_type"], v["norm_eps"], v["layer_scale_init"]) == \
        (True, False, "rms_norm", 1e-6, 0.1)
    full = hc.vision_from_chat({}, "c")
    assert (full["hidden_size"], full["num_attention_heads"], full["num_layers"], full["image_size"]) == (3200, 25, 48, 224)
    explicit = hc.vision_from_chat({**VIT_SHAPES, "qk_normalization": False, "norm_type": "layer_norm"}, "c")
    assert not explicit["qk_norm"] and explicit["norm_type"] == "layer_norm"


def _chat(**top) -> dict:
    return {"architectures": ["InternVLChatModel"], "ps_version": "v2", "img_context_token_id": 7,
            "llm_config": {**QWEN, "architectures": ["Qwen2ForCausalLM"]}, "vision_config": VIT_SHAPES, **top}


def test_chat_config_defaults_and_refusals(tmp_path):
    md = CHAT.model_dict(_chat(), tmp_path)
    assert md["vision"]["select_layer"] == -1 and md["projector"]["downsample_ratio"] == 0.5
    assert md["vision"]["qk_norm"] and not md["llm"]["tie_embeddings"]
    missing_ps = _chat()
    del missing_ps["ps_version"]
    for cfg, match in ((missing_ps, "ps_version='v1'"), (_chat(ps_version="v1"), "only v2"),
                       (_chat(use_backbone_lora=16), "LoRA"), (_chat(use_llm_lora=8), "merge the LoRA"),
                       (_chat(force_image_size=112), "force_image_size=112 differs"),
                       (_chat(llm_config={**QWEN}), "llm_config has no architectures")):
        with pytest.raises(ConfigError, match=match):
            CHAT.model_dict(cfg, tmp_path)
    assert CHAT.model_dict(_chat(force_image_size=56), tmp_path)["vision"]["image_size"] == 56


def test_native_config_ties_unless_it_says_otherwise(tmp_path):
    from engine.checkpoint.hf_config import INTERNVL_VISION_DEFAULTS as VD

    base = {"architectures": ["InternVLForConditionalGeneration"], "text_config": {**QWEN, "tie_word_embeddings": False},
            "vision_config": {**VD, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}}
    assert NATIVE.model_dict(base, tmp_path)["llm"]["tie_embeddings"]  # InternVLConfig's default: tied
    assert not NATIVE.model_dict({**base, "tie_word_embeddings": False}, tmp_path)["llm"]["tie_embeddings"]


def test_qwen2_defaults_for_missing_keys():
    d = hc.llm_from_hf({"num_attention_heads": 4, "hidden_size": 64}, "c")
    assert (d["vocab_size"], d["num_layers"], d["ffn_hidden_size"], d["norm_eps"], d["max_position_embeddings"],
            d["rope_theta"]) == (151936, 32, 22016, 1e-6, 32768, 10000.0)
    assert d["num_query_groups"] == 32  # Qwen2Config: a missing num_key_value_heads is 32 ...
    assert hc.llm_from_hf({**QWEN, "num_key_value_heads": None}, "c")["num_query_groups"] == 4  # ... null: MHA
    with pytest.raises(ConfigError, match="layer_types"):
        hc.llm_from_hf({**QWEN, "layer_types": ["full_attention", "sliding_attention"]}, "c")


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e6},
                                  {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}])
def test_dynamic_ntk_rope_is_read_and_written_back(rope):
    from engine.config.model import LLMConfig, ModelConfig

    d = hc.llm_from_hf({**QWEN, **rope}, "c")  # InternVL3's llm_config (4.x and 5.x spellings)
    assert (d["rope_scaling"], d["rope_scaling_factor"], d["rope_theta"]) == ("dynamic", 2.0, 1e6)
    out = hc.llm_to_hf(ModelConfig(llm=LLMConfig(**d)))
    assert out["rope_scaling"] == {"rope_type": "dynamic", "type": "dynamic", "factor": 2.0}
    assert out["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "dynamic", "type": "dynamic", "factor": 2.0}
    assert hc.llm_from_hf(out, "c") == d


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "RoPE scaling 'yarn'"),
    ({"type": "linear", "factor": 2.0}, "RoPE scaling 'linear'"),
    ({"type": "dynamic", "factor": 2.0, "max_trained_positions": 4096}, "max_trained_positions"),
    ({"type": "dynamic", "alpha": 1000.0}, r"\['alpha'\]"),
])
def test_other_rope_scalings_are_refused(rope, match):
    with pytest.raises(ConfigError, match=match):
        hc.llm_from_hf({**QWEN, "rope_scaling": rope}, "c")


def test_rope_scaling_fields_are_validated():
    from engine.config import Config
    from engine.config.base import from_dict, validate_tree

    def cfg(**llm):
        return {"model": {"llm": {"max_position_embeddings": 4096, **llm}}, "train": {"seq_length": 4096},
                "rollout": {"max_model_len": 4096}}

    validate_tree(from_dict(Config, cfg(rope_scaling="dynamic", rope_scaling_factor=2.0)))
    with pytest.raises(ConfigError, match="without a rope_scaling"):
        validate_tree(from_dict(Config, cfg(rope_scaling_factor=2.0)))
    too_long = cfg(rope_scaling="dynamic", rope_scaling_factor=2.0)
    too_long["rollout"]["max_model_len"] = 8192
    with pytest.raises(ConfigError, match="rollout.max_model_len=8192 exceeds"):
        validate_tree(from_dict(Config, too_long))
