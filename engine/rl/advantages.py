"""GRPO group advantages, per sequence, and their broadcast to tokens.

Rewards arrive flat, `[N]` with N = num_groups * G, grouped contiguously: samples
`g*G .. g*G+G-1` answer the same prompt (the order the rollout engine returns them in).
"""

from __future__ import annotations

from typing import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            "pass all G samples of every prompt, contiguously"
        )
    return rewards.float().view(-1, group_size)  # (num_groups, G)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, unbiased_std: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps) within each group; returns [N].

    `unbiased_std=True` matches torch.std / verl (Bessel's correction); a group of equal
    rewards gets A = 0 exactly (the numerator is 0).
    """
    if group_size < 2:
        raise ValueError("grpo advantages need group_size >= 2 (std of one sample is undefined); use 'mean_only'")
    r = _grouped(rewards, group_size)  # (num_groups, G)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=unbiased_std)
    centered = r - mean
    # an all-equal group has centered == 0; keep A = 0 exactly even with eps = 0 (0/0)
    return torch.where(centered == 0, torch.zeros_like(centered), centered / (std + eps)).reshape(-1)


@register_advantage("mean_only")
def mean_only_advantages(rewards: torch.Tensor, group_size: int, **_: object) -> torch.Tensor:
    """Dr.GRPO-style A_i = r_i - mean_g(r): no std division (no difficulty re-weighting); returns [N]."""
    r = _grouped(rewards, group_size)  # (num_groups, G)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


def compute_advantages(name: str, rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Dispatch by estimator name ('grpo' | 'mean_only')."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, eps=eps)


def broadcast_to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages [B] -> per-token [B, S], zero where loss_mask is 0."""
    if advantages.dim() != 1 or loss_mask.dim() != 2 or advantages.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"advantages must be [B] and loss_mask [B, S] with the same B; got {tuple(advantages.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    return advantages.float()[:, None] * loss_mask.float()  # (B, 1) * (B, S)
