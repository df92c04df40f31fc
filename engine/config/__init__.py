"""One typed config tree: model / parallel / optim / data / train; YAML recipes + overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.config.algorithm import AlgorithmConfig
from engine.config.base import ConfigError, apply_overrides, deep_merge, field_, from_dict, to_dict, validate_tree
from engine.config.data import DataConfig
from engine.config.model import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from engine.config.optim import OptimConfig
from engine.config.parallel import ParallelConfig
from engine.config.performance import PerformanceConfig
from engine.config.rollout import RolloutConfig
from engine.config.train import TrainConfig


@dataclass
class Config:
    model: ModelConfig = field_(factory=ModelConfig, help="architecture")
    parallel: ParallelConfig = field_(factory=ParallelConfig, help="TP / PP layout")
    optim: OptimConfig = field_(factory=OptimConfig, help="optimizer and LR schedule")
    data: DataConfig = field_(factory=DataConfig, help="data files and pipeline")
    train: TrainConfig = field_(factory=TrainConfig, help="training loop")
    algorithm: AlgorithmConfig = field_(factory=AlgorithmConfig, help="RL / preference algorithms (GRPO, MPO, SSB, rewards)")
    rollout: RolloutConfig = field_(factory=RolloutConfig, help="generation backend for RL and evaluation")
    performance: PerformanceConfig = field_(factory=PerformanceConfig, help="speed/memory switches (fusions, overlap, recompute)")


def _read_yaml(path: Path) -> dict:
    """Read a recipe; `base: other.yaml` (relative to it) is merged underneath."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    base = data.pop("base", None)
    if base:
        data = deep_merge(_read_yaml(path.parent / base), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (optional) + `key.sub=value` overrides -> validated Config."""
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None
    try:
        validate_tree(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None
    return cfg


__all__ = [
    "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "LLMConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PerformanceConfig", "ProjectorConfig", "RolloutConfig", "TrainConfig", "VisionConfig", "field_", "load_config",
    "to_dict",
]
