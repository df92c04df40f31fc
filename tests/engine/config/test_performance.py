"""performance.*: each switch resolves per machine, is rejected where it cannot run, and reaches megatron."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.model import specs
from engine.model.transformer_configs import _common, llm_transformer_config, vision_transformer_config
from engine.parallel.wrap import ddp_config

R1V2_SFT = Path(__file__).resolve().parents[3] / "recipes" / "r1v2_sft.yaml"


@pytest.fixture
def with_te(monkeypatch):
    """TE cannot be installed here: pretend it imports (config resolution only; nothing TE is built)."""
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)


def test_cpu_resolution_is_the_old_behaviour():
    cfg = load_config(R1V2_SFT)
    perf = cfg.performance.resolve(cfg, cuda=False)
    assert perf.cpu_initialization and not perf.overlap_grad_reduce and not perf.bias_activation_fusion
    assert not perf.gradient_accumulation_fusion and not perf.rope_fusion and not perf.overlap_param_gather


def test_gpu_resolution_turns_the_safe_switches_on(with_te):
    cfg = load_config(R1V2_SFT)
    perf = cfg.performance.resolve(cfg, cuda=True)  # transformer_impl auto -> TE
    assert not perf.cpu_initialization and perf.overlap_grad_reduce and perf.bias_activation_fusion
    assert perf.gradient_accumulation_fusion and perf.rope_fusion
    assert perf.recompute_granularity == "selective" and perf.recompute_modules == ("mlp",)  # recipe recomputes
    local = load_config(R1V2_SFT, ["model.transformer_impl=local"]).performance.resolve(
        load_config(R1V2_SFT, ["model.transformer_impl=local"]), cuda=True)
    assert not local.gradient_accumulation_fusion and not local.rope_fusion and local.bias_activation_fusion


def test_switches_reach_the_transformer_and_ddp_configs(with_te):
    cfg = load_config(R1V2_SFT, ["model.transformer_impl=local"])
    perf = dataclasses.replace(cfg.performance.resolve(cfg, cuda=True), gradient_accumulation_fusion=True,
                               rope_fusion=True)
    kw = _common(cfg.model, cfg.parallel, perf)  # rope fusion needs TE to build a TransformerConfig: check the kwargs
    assert kw["apply_rope_fusion"] and kw["gradient_accumulation_fusion"] and kw["bias_activation_fusion"]
    assert kw["use_cpu_initialization"] is False and kw["masked_softmax_fusion"] is False
    built = llm_transformer_config(cfg.model, cfg.parallel, perf=dataclasses.replace(perf, rope_fusion=False),
                                   train_cfg=cfg.train)
    assert built.gradient_accumulation_fusion and built.bias_activation_fusion and not built.use_cpu_initialization
    assert built.recompute_granularity == "selective" and built.recompute_modules == ["mlp"]
    assert not built.apply_rope_fusion
    full = llm_transformer_config(cfg.model, cfg.parallel, perf=dataclasses.replace(
        perf, rope_fusion=False, recompute_granularity="full"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    vit = vision_transformer_config(cfg.model, cfg.parallel, perf=dataclasses.replace(perf, rope_fusion=False))
    assert vit.bias_activation_fusion and vit.sequence_parallel is False and vit.pipeline_model_parallel_size == 1
    ddp = ddp_config(cfg, dataclasses.replace(perf, overlap_param_gather=True))
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.use_distributed_optimizer
    assert not ddp_config(cfg, cfg.performance.resolve(cfg, cuda=False)).overlap_grad_reduce


def test_vpp_reaches_megatron():
    cfg = load_config(R1V2_SFT, ["parallel.virtual_pipeline_model_parallel_size=2"])
    tcfg = llm_transformer_config(cfg.model, cfg.parallel, perf=cfg.performance.resolve(cfg, cuda=False))
    assert tcfg.virtual_pipeline_model_parallel_size == 2


@pytest.mark.parametrize("overrides,message", [
    (["performance.gradient_accumulation_fusion=true", "model.transformer_impl=local"],
     "gradient_accumulation_fusion=true needs the Transformer Engine layer spec"),
    (["performance.rope_fusion=true"], "rope_fusion=true needs Transformer Engine"),
    (["performance.overlap_param_gather=true", "parallel.use_distributed_optimizer=false"],
     "needs parallel.use_distributed_optimizer=true"),
    (["performance.overlap_param_gather=true", "performance.overlap_grad_reduce=false"], "needs performance.overlap_grad_reduce"),
    (["performance.overlap_param_gather=true", "train.stage=grpo", "data.format=rl", "data.packing=false",
      "rollout.max_model_len=16384", "train.global_batch_size=1024"],
     "not for train.stage=grpo"),
    (["performance.recompute_modules=[moe]"], "not recompute modules of a dense layer"),
    (["parallel.virtual_pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1"],
     "needs parallel.pipeline_model_parallel_size >= 2"),
    (["parallel.virtual_pipeline_model_parallel_size=3"], "not divisible by PP x virtual stages"),
    (["parallel.sequence_parallel=true", "train.seq_length=16380"], "multiple of it"),
])
def test_impossible_switches_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(R1V2_SFT, overrides)
