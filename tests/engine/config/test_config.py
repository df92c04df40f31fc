"""Config tree: recipes validate, overrides are typed, bad keys/combinations say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config

RECIPES = sorted(p for p in (Path(__file__).resolve().parents[3] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.model.tokens_per_tile > 0
    assert cfg.model.llm.num_layers % cfg.parallel.pipeline_model_parallel_size == 0


def test_38b_layout_is_tp8_pp4_with_padded_vit_heads():
    cfg = load_config(Path("recipes/r1v2_sft.yaml"))
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (8, 4)
    assert cfg.model.vision.built_heads == 32 and cfg.model.tokens_per_tile == 256
    # 152064 = 128 x 1188 is not a multiple of 128 x 8: megatron pads to 128 x 8 x 149
    assert cfg.model.llm.padded_vocab_size(8) == 152576


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.max_steps=7", "optim.lr=3e-4", "model.llm.tie_embeddings=true",
                             "data.tile_size=448"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.optim.lr, float) and cfg.model.llm.tie_embeddings is True


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*Did you mean 'max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got 'abc'"):
        load_config(None, ["train.max_steps=abc"])


def test_literal_choices_are_listed():
    with pytest.raises(ConfigError, match=r"model.vision.norm_type: 'batch_norm' is not one of"):
        load_config(None, ["model.vision.norm_type=batch_norm"])


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"model.llm.num_attention_heads=14 is not divisible by parallel.tensor_model_parallel_size=4"):
        load_config(None, ["parallel.tensor_model_parallel_size=4"])


def test_vit_heads_need_padding_for_tp():
    with pytest.raises(ConfigError, match=r"set model.vision.padded_num_heads to a multiple of 8"):
        load_config(Path("recipes/r1v2_sft.yaml"), ["model.vision.padded_num_heads=0"])


def test_layers_not_divisible_by_pp():
    with pytest.raises(ConfigError, match=r"model.llm.num_layers=24 is not divisible by parallel.pipeline_model_parallel_size=5"):
        load_config(None, ["parallel.pipeline_model_parallel_size=5"])


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: 3\n  global_batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.global_batch_size=8 is not a multiple of train.micro_batch_size=3"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_base_recipe_is_merged_underneath(tmp_path):
    (tmp_path / "a.yaml").write_text("optim: {lr: 0.5}\ntrain: {max_steps: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.5 and cfg.train.max_steps == 9


def test_fp8_without_transformer_engine_says_what_to_do():
    with pytest.raises(ConfigError, match=r"train.fp8=hybrid needs Transformer Engine .* unset train.fp8"):
        load_config(Path("recipes/r1v2_sft.yaml"), ["train.fp8=hybrid"])


def test_fp8_settings_reach_megatron_when_transformer_engine_is_there(monkeypatch):
    """TE cannot be installed here: pretend it imports, and check the settings pass through unchanged."""
    from engine.model import specs
    from engine.model.transformer_configs import fp8_kwargs

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    cfg = load_config(Path("recipes/r1v2_sft.yaml"), ["train.fp8=hybrid", "train.fp8_amax_history_len=16",
                                                       "train.fp8_margin=1"])
    assert fp8_kwargs(cfg.train) == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 1,
                                     "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max"}
    with pytest.raises(ConfigError, match="needs model.params_dtype=bfloat16"):
        load_config(Path("recipes/r1v2_sft.yaml"), ["train.fp8=hybrid", "model.params_dtype=float32"])


# ----------------------------------------------------------------------------------- value ranges (issue 13.9)
@pytest.mark.parametrize("override,message", [
    ("train.max_bad_steps=0", r"train.max_bad_steps=0 is outside the allowed range \[1, inf\)"),
    ("train.log_interval=0", r"train.log_interval=0 is outside the allowed range \[1, inf\)"),
    ("train.max_steps=-5", r"train.max_steps=-5 is outside the allowed range \[1, inf\)"),
    ("optim.adam_beta1=2", r"optim.adam_beta1=2.0 is outside the allowed range \[0, 1\)"),
    ("optim.lr=nan", r"optim.lr=nan is outside the allowed range \(0, inf\) \(NaN is never allowed\)"),
    ("optim.lr=.inf", r"optim.lr=inf is outside the allowed range \(0, inf\)"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 is outside"),
    ("model.llm.rope_theta=0", r"model.llm.rope_theta=0.0 is outside the allowed range \(0, inf\)"),
    ("algorithm.grpo.top_p=0", r"algorithm.grpo.top_p=0.0 is outside the allowed range \(0, 1\]"),
    ("algorithm.iterative_sft.lrs=[1e-4, -1, 2e-5, 2e-5]", r"algorithm.iterative_sft.lrs\[1\]=-1.0 is outside"),
    ("rollout.kv_cache_bytes=0", r"rollout.kv_cache_bytes=0 is outside"),
])
def test_numeric_values_outside_their_range_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_range_ends_are_allowed_where_the_interval_is_closed():
    cfg = load_config(None, ["algorithm.decoding.ban_bias=-.inf", "optim.adam_beta1=0", "train.save_interval=0",
                             "algorithm.grpo.dual_clip_c=null"])
    assert cfg.algorithm.decoding.ban_bias == float("-inf") and cfg.algorithm.grpo.dual_clip_c is None


def _numeric_fields(cls, where=""):
    import dataclasses
    from typing import get_type_hints

    from engine.config.base import numeric_kind

    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _numeric_fields(hints[f.name], path)
        elif numeric_kind(hints[f.name]) is not None:
            yield path, f


def test_every_numeric_field_of_the_tree_declares_its_range():
    from engine.config import Config

    fields = list(_numeric_fields(Config))
    assert len(fields) > 100  # the whole tree, not one section
    missing = [path for path, f in fields if "bounds" not in f.metadata]
    assert not missing, f"numeric config fields without bounds=...: {missing}"
    # and every default lies in its own range
    cfg = load_config(None, [])
    for path, f in fields:
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        for v in (value if isinstance(value, list) else [value]):
            assert v is None or f.metadata["bounds"].contains(v), (path, v)


def test_fused_linear_loss_is_accepted_for_every_stage():
    # the stages that generate (grpo, iterative_sft) switch the output layer back to logits inside the native engine
    for stage, extra in (("sft", []), ("mpo", []), ("iterative_sft", []),
                         ("grpo", ["data.format=rl", "data.packing=false", "rollout.max_model_len=16384",
                                   "train.global_batch_size=1024"])):
        cfg = load_config(None, [f"train.stage={stage}", "train.loss_impl=fused_linear", *extra])
        assert cfg.train.loss_impl == "fused_linear"
