"""Optimizer and learning-rate schedule sub-config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class OptimConfig:
    lr: float = field_(1e-5, "peak learning rate")
    min_lr: float = field_(0.0, "floor of the decay")
    weight_decay: float = field_(0.05, "decoupled (AdamW) weight decay")
    adam_beta1: float = field_(0.9, "Adam beta1")
    adam_beta2: float = field_(0.999, "Adam beta2")
    adam_eps: float = field_(1e-8, "Adam epsilon")
    clip_grad: float = field_(1.0, "global grad-norm clip (0 disables)")
    warmup_ratio: float = field_(0.03, "linear warmup as a share of train.max_steps")
    decay_style: Literal["cosine", "constant", "linear"] = field_("cosine", "LR decay after warmup")

    def validate(self, root) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")
