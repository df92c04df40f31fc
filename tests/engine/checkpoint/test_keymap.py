"""The key-mapping table and config mapping, without megatron: layouts of fused tensors, inverses, refusals."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint import hf_config as hc
from engine.checkpoint.adapters import ADAPTERS, detect_layout
from engine.checkpoint.hf_io import CheckpointError
from engine.checkpoint.keymap import LLM_RULES, PROJECTOR_RULES, VISION_RULES, fuse, split
from engine.config.base import ConfigError
from engine.config.model import LLMConfig, ModelConfig, VisionConfig


def _mcfg(heads=4, groups=2, vit_heads=4) -> ModelConfig:
    return ModelConfig(llm=LLMConfig(hidden_size=8 * heads, num_attention_heads=heads, num_query_groups=groups),
                       vision=VisionConfig(hidden_size=8 * vit_heads, num_attention_heads=vit_heads))


def _labelled(rows: int, tag: float) -> torch.Tensor:
    return tag + torch.arange(rows, dtype=torch.float64)[:, None] / 1000 * torch.ones(rows, 3)


def test_llm_qkv_is_megatron_gqa_order():
    m = _mcfg(heads=4, groups=2)  # d = 8; 2 query heads per group
    q, k, v = _labelled(32, 1), _labelled(16, 2), _labelled(16, 3)
    fused = fuse("llm_qkv", [q, k, v], m)
    d = 8
    expect = torch.cat([q[0:16], k[0:d], v[0:d], q[16:32], k[d:2 * d], v[d:2 * d]])  # [q_g; k_g; v_g] per group
    assert torch.equal(fused, expect)
    assert all(torch.equal(a, b) for a, b in zip(split("llm_qkv", fused, m), [q, k, v]))


def test_vit_qkv_is_per_head_interleaved_for_both_spellings():
    m = _mcfg(vit_heads=4)  # C = 32, d = 8
    q, k, v = _labelled(32, 1), _labelled(32, 2), _labelled(32, 3)
    ours = fuse("vit_qkv", [q, k, v], m)
    head1 = ours[24:48]  # head 1 = rows [q_1; k_1; v_1]
    assert torch.equal(head1, torch.cat([q[8:16], k[8:16], v[8:16]]))
    assert torch.equal(fuse("vit_qkv_fused", [torch.cat([q, k, v])], m), ours)
    assert torch.equal(split("vit_qkv_fused", ours, m)[0], torch.cat([q, k, v]))
    assert all(torch.equal(a, b) for a, b in zip(split("vit_qkv", ours, m), [q, k, v]))


@pytest.mark.parametrize("kind,n", [("copy", 1), ("cat", 2)])
def test_simple_fuses_invert(kind, n):
    parts = [torch.randn(6, 5) for _ in range(n)]
    back = split(kind, fuse(kind, parts, _mcfg()), _mcfg())
    assert all(torch.equal(a, b) for a, b in zip(back, parts))


def test_table_has_every_hf_name_once_per_style():
    for rules, styles in ((LLM_RULES, ["hf"]), (VISION_RULES, ["native", "chat"]), (PROJECTOR_RULES, ["native", "chat"])):
        for style in styles:
            names = [n for r in rules for n in r.hf[style][0]]
            assert len(names) == len(set(names)), style


def test_layouts_are_detected_and_unknown_is_refused():
    assert detect_layout({"architectures": ["SkyworkR1VChatModel"]}).name == "internvl_chat"
    assert detect_layout({"model_type": "internvl"}).name == "internvl"
    assert detect_layout({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    with pytest.raises(CheckpointError, match="not a layout we convert"):
        detect_layout({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


QWEN = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("bad,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_llm_config_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        hc.llm_from_hf({**QWEN, **bad}, "config.json")


def test_llm_config_round_trips():
    d = hc.llm_from_hf({**QWEN, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, "c")
    m = ModelConfig(llm=LLMConfig(**d))
    back = hc.llm_from_hf(hc.llm_to_hf(m), "c")
    assert back == d and back["rope_theta"] == 5e5 and back["num_query_groups"] == 2


def test_select_layer_conventions():
    assert hc._select_from_hf(-1, "c") == -1 and hc._select_from_hf(-4, "c") == -4
    assert hc._select_from_hf(3, "c") == 2  # HF hidden_states[3] = output of block index 2
    with pytest.raises(ConfigError, match="patch embeddings"):
        hc._select_from_hf(0, "c")


def test_native_vision_with_final_layernorm_is_refused():
    v = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=[56, 56],
             patch_size=[14, 14], use_mean_pooling=False)
    with pytest.raises(ConfigError, match="use_mean_pooling"):
        hc.vision_from_native(v, "config.json")


def test_chat_config_without_image_token_is_refused(tmp_path):
    cfg = {"architectures": ["InternVLChatModel"], "ps_version": "v2",
           "llm_config": {**QWEN, "architectures": ["Qwen2ForCausalLM"]},
           "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56, patch_size=14)}
    with pytest.raises(CheckpointError, match="--image-token-id"):
        ADAPTERS["internvl_chat"].model_dict(cfg, tmp_path)
    assert ADAPTERS["internvl_chat"].model_dict({**cfg, "img_context_token_id": 7}, tmp_path)["image_token_id"] == 7
