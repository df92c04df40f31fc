import dataclasses

import pytest

from engine.config.algorithm import PRESETS, AlgorithmConfig
from engine.config.base import ConfigError, apply_overrides, from_dict, validate_tree


def _load(data: dict) -> AlgorithmConfig:
    cfg = from_dict(AlgorithmConfig, data)
    validate_tree(cfg)
    return cfg


def test_defaults_are_r1v3_grpo():
    cfg = _load({})
    g = cfg.grpo
    assert (g.group_size, g.rollouts_per_episode, g.mini_batch_size, g.kl_coef, g.clip_eps_low, g.clip_eps_high) == \
        (32, 1024, 32, 0.0, 0.2, 0.2)
    assert g.gradient_steps_per_episode == 1 and g.prompts_per_episode == 32
    assert cfg.reward.name == "r1v3" and cfg.reward.epsilon == 0.8
    assert cfg.iterative_sft.tau_schedule == [2.0, 3.0, 4.0, 5.0]
    assert cfg.metrics.entropy_threshold == 6.8


def test_every_field_has_help():
    sections = [AlgorithmConfig] + [type(getattr(AlgorithmConfig(), f.name)) for f in dataclasses.fields(AlgorithmConfig)]
    for cls in sections:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_validate(name):
    cfg = _load(PRESETS[name])
    assert cfg.reward.name == name


@pytest.mark.parametrize("override,message", [
    ("grpo.group_size=3", "multiple of"),
    ("grpo.dual_clip_c=0.9", "dual_clip_c"),
    ("grpo.kl_coef=-1", "kl_coef"),
    ("reward.epsilon=1.5", "epsilon"),
    ("reward.verifier_template=no fields", "verifier_template"),
    ("decoding.mode=budget", "thinking_budget"),
    ("decoding.ban_bias=5", "ban_bias"),
    ("iterative_sft.lrs=[1e-4]", "one lr per iteration"),
    ("ssb.max_mix_fraction=2", "max_mix_fraction"),
    ("mpo.beta=0", "beta"),
])
def test_bad_values_say_what_to_change(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(apply_overrides({}, [override]))


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="clip_eps_high"):
        _load({"grpo": {"clip_eps_hi": 0.28}})


def test_config_lists_match_the_library_defaults():
    from engine.rl.metrics import DEFAULT_HALLUCINATION_PHRASES, DEFAULT_REASONING_WORDS
    cfg = AlgorithmConfig()
    assert tuple(cfg.metrics.hallucination_phrases) == DEFAULT_HALLUCINATION_PHRASES
    assert tuple(cfg.metrics.reasoning_words) == DEFAULT_REASONING_WORDS == tuple(cfg.decoding.banned_words)


@pytest.mark.parametrize("override,message", [
    ("grpo.seq_mean_counts_empty=true", "only in the seq-mean"),
    ("decoding.thinking_budget=16", "act only in mode=budget"),
    ("decoding.answer_prefix=Final", "act only in mode=budget"),
])
def test_knobs_that_would_do_nothing_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        _load(apply_overrides({}, [override]))


def test_aggregation_modes_match_the_kernels():
    import kernels
    from engine.config.algorithm import AGG_MODES

    assert AGG_MODES == kernels.AGGREGATION_MODES


GRPO = ["train.stage=grpo", "data.format=rl", "data.packing=false", "train.global_batch_size=1024",
        "algorithm.grpo.max_response_length=1024"]


@pytest.mark.parametrize("overrides,message", [
    (["train.global_batch_size=8"], "mini_batch_size x group_size = 32 x 32 = 1024"),
    (["algorithm.decoding.mode=nothink"], "set data.thinking=no_think"),
    (["data.thinking=no_think", "algorithm.decoding.mode=nothink"], "set prompt_opens_think=false"),
    (["data.thinking=no_think", "algorithm.reward.prompt_opens_think=false"], "set data.thinking=think"),
])
def test_grpo_stage_rejects_knobs_it_would_ignore(overrides, message):
    from engine.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, GRPO + overrides)
    assert load_config(None, GRPO + ["data.thinking=no_think", "algorithm.decoding.mode=nothink",
                                     "algorithm.reward.prompt_opens_think=false"]).algorithm.decoding.mode == "nothink"
