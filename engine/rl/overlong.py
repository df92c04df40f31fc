"""What a response that hit the length limit (no stop token) gets: its reward as scored, zero reward,
or DAPO's overlong filtering (kept in the group's advantage, left out of the loss).

A truncated response is not an answer: without this, a tail of junk after `\\boxed{}` that runs to the
limit is scored like a finished answer and reinforced, and response length drifts up to the limit.
"""

from __future__ import annotations

from typing import Literal

import torch

OverlongPolicy = Literal["keep", "zero_reward", "mask"]


def apply_overlong_reward(policy: OverlongPolicy, total: torch.Tensor, components: dict[str, torch.Tensor],
                          finished: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """zero_reward: the total and every component are 0 for unfinished samples ([N] bool `finished`)."""
    if policy != "zero_reward":
        return total, components
    keep = finished.to(total.dtype)
    return total * keep, {k: v * keep.to(v.dtype) for k, v in components.items()}


def overlong_loss_keep(policy: OverlongPolicy, finished: torch.Tensor) -> torch.Tensor:
    """[N] bool: which samples enter the policy loss (mask: only finished ones)."""
    return finished.clone() if policy == "mask" else torch.ones_like(finished)
