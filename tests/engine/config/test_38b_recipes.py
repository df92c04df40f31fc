"""Each 38B recipe's LLM is its base model's config.json as the converter reads it (issue 13 item 12e).

The config.json values below are the LLMs' published ones (architecture keys only); the converter maps them
(hf_config.llm_from_hf) and the recipe's model.llm must come out equal, so a converted checkpoint and the
recipe agree (train.init_from, check-recipe). Which recipe trains which LLM: the Skywork reports (R1V: the
R1-distilled Qwen-32B, after an MLP initialisation on Qwen2.5-32B-Instruct; R1V2: QwQ-32B; R1V3: InternVL3-38B).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoint import hf_config as hc
from engine.config import load_config
from engine.config.base import to_dict

QWEN25_32B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8, rope_theta=1000000.0, hidden_act="silu",
                  use_sliding_window=False, tie_word_embeddings=False)
LLMS = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (Skywork-R1V-38B's llm_config: max_position_embeddings 131072)
    "r1_distill_qwen_32b": {**QWEN25_32B, "vocab_size": 152064, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5},
    # Qwen/QwQ-32B
    "qwq_32b": {**QWEN25_32B, "vocab_size": 152064, "max_position_embeddings": 40960, "rms_norm_eps": 1e-5},
    # Qwen/Qwen2.5-32B-Instruct
    "qwen25_32b_instruct": {**QWEN25_32B, "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    # OpenGVLab/InternVL3-38B's llm_config (InternVL3 family: InternVL's tokenizer, dynamic NTK x2)
    "internvl3_38b": {**QWEN25_32B, "vocab_size": 151674, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                      "rope_scaling": {"type": "dynamic", "factor": 2.0}},
}
RECIPES = {
    "r1v_mlp_init": "qwen25_32b_instruct",  # the substitute LLM of R1V's MLP initialisation
    "r1v_modality_alignment": "r1_distill_qwen_32b", "r1v_iterative_sft": "r1_distill_qwen_32b",
    "r1v_grpo": "r1_distill_qwen_32b", "r1v_alcotd": "r1_distill_qwen_32b",
    "r1v2_sft": "qwq_32b", "r1v2_mpo": "qwq_32b", "r1v2_grpo": "qwq_32b",
    "r1v3_cold_start_sft": "internvl3_38b", "r1v3_grpo": "internvl3_38b", "r1v3_connector_tuning": "internvl3_38b",
}


def test_every_38b_recipe_is_listed():
    assert sorted(p.stem for p in Path("recipes").glob("r1v*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_llm_is_its_base_models_config(recipe):
    cfg = load_config(Path(f"recipes/{recipe}.yaml"))
    ours = {k: v for k, v in to_dict(cfg.model.llm).items() if k not in ("freeze", "make_vocab_size_divisible_by")}
    expect = {**hc.llm_from_hf(LLMS[RECIPES[recipe]], "config.json"), "tie_embeddings": False}
    assert ours == expect
    assert cfg.train.seq_length <= cfg.model.llm.max_position_embeddings  # where dynamic NTK is plain RoPE
