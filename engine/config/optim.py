"""Optimizer and learning-rate schedule sub-config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class OptimConfig:
    lr: float = field_(1e-5, "peak learning rate", bounds="(0, inf)")
    min_lr: float = field_(0.0, "floor of the decay", bounds="[0, inf)")
    weight_decay: float = field_(0.05, "decoupled (AdamW) weight decay", bounds="[0, inf)")
    adam_beta1: float = field_(0.9, "Adam beta1", bounds="[0, 1)")
    adam_beta2: float = field_(0.999, "Adam beta2", bounds="[0, 1)")
    adam_eps: float = field_(1e-8, "Adam epsilon", bounds="(0, inf)")
    clip_grad: float = field_(1.0, "global grad-norm clip (0 disables)", bounds="[0, inf)")
    warmup_ratio: float = field_(0.03, "linear warmup as a share of train.max_steps", bounds="[0, 1)")
    decay_style: Literal["cosine", "constant", "linear"] = field_("cosine", "LR decay after warmup")

    def validate(self, root) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")
