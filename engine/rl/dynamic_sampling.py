"""Dynamic sampling (DAPO / R1V3 "tricks tried"): drop groups whose G rewards are all equal
(they have zero advantage and give no gradient), and refill the batch from further rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def informative_groups(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """Bool [num_groups]: True where the group's rewards are not all equal (max - min > atol)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)  # (num_groups, G)
    return (r.max(dim=1).values - r.min(dim=1).values) > atol


def filter_groups(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> tuple[torch.Tensor, int]:
    """Sample indices [n_kept * G] of the informative groups, and how many groups were dropped."""
    keep = informative_groups(rewards, group_size, atol)
    sample_idx = torch.arange(rewards.numel()).view(-1, group_size)[keep].reshape(-1)  # (kept groups * G,)
    return sample_idx, int((~keep).sum())


@dataclass
class Group:
    """All G finished samples of one prompt."""
    prompt_id: Any
    rewards: torch.Tensor  # [G]
    payload: Any = None    # whatever the trainer needs later (token ids, logprobs, ...)

    def is_informative(self, atol: float = 0.0) -> bool:
        return bool((self.rewards.max() - self.rewards.min()) > atol)


@dataclass
class DynamicSampler:
    """Collects finished groups until `target_groups` informative ones are there.

    Usage: while not sampler.ready: sampler.add(rollout(...)); batch = sampler.pop_batch().
    Dropped groups are counted, never silently lost; surplus informative groups carry over to
    the next batch. After `max_rounds` add() calls without filling a batch, add() raises.
    """
    target_groups: int
    max_rounds: int = 8  # rollout rounds per batch before giving up (DAPO's max_num_gen_batches)
    atol: float = 0.0
    pool: list[Group] = field(default_factory=list)
    dropped: int = 0          # groups dropped for the batch being assembled
    dropped_total: int = 0
    rounds: int = 0           # add() calls for the batch being assembled

    @property
    def ready(self) -> bool:
        return len(self.pool) >= self.target_groups

    def add(self, groups: list[Group]) -> None:
        self.rounds += 1
        for g in groups:
            if g.is_informative(self.atol):
                self.pool.append(g)
            else:
                self.dropped += 1
                self.dropped_total += 1
        if not self.ready and self.rounds >= self.max_rounds:
            raise RuntimeError(
                f"dynamic sampling: only {len(self.pool)}/{self.target_groups} informative groups after "
                f"{self.rounds} rollout rounds ({self.dropped} groups had identical rewards); the data is too "
                "easy or too hard for the policy — raise algorithm.grpo.dynamic_sampling_max_rounds or filter prompts"
            )

    def pop_batch(self) -> tuple[list[Group], dict[str, int]]:
        """The first `target_groups` informative groups and stats for this batch."""
        if not self.ready:
            raise RuntimeError(f"pop_batch() before ready: {len(self.pool)}/{self.target_groups} groups")
        batch, self.pool = self.pool[: self.target_groups], self.pool[self.target_groups:]
        stats = {"dropped_groups": self.dropped, "rollout_rounds": self.rounds, "carried_over": len(self.pool)}
        self.dropped, self.rounds = 0, 0
        return batch, stats


def assemble_batch(pool: list[Group], target_groups: int, atol: float = 0.0) -> tuple[list[Group], list[Group], int]:
    """One-shot form: (batch of up to target_groups informative groups, leftover informative groups,
    number dropped). len(batch) < target_groups means the caller must roll out more."""
    informative = [g for g in pool if g.is_informative(atol)]
    return informative[:target_groups], informative[target_groups:], len(pool) - len(informative)
