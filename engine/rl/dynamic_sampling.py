"""Dynamic sampling (DAPO / R1V3 "tricks tried"): drop groups whose G rewards are all equal (they have zero
advantage and give no gradient) and roll out further prompts to refill the batch.

What the GRPO episode does with it (engine/train/grpo_episode.py): each rollout round keeps the
informative groups; after `algorithm.grpo.dynamic_sampling_max_rounds` rounds a batch that is still short
is topped up with that round's uninformative groups (advantage 0: they fill the batch but carry no
gradient), so an episode never fails for lack of signal. The dropped and topped-up groups are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def informative_groups(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """Bool [num_groups]: True where the group's rewards are not all equal (max - min > atol)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)  # (num_groups, G)
    return (r.max(dim=1).values - r.min(dim=1).values) > atol


@dataclass
class RoundSelection:
    keep: torch.Tensor  # bool [num_groups * G]: the samples of this round that join the batch
    dropped: int        # uninformative groups left out
    topped_up: int      # uninformative groups kept on the last round to fill the batch


def select_round(rewards: torch.Tensor, group_size: int, missing: int, last_round: bool,
                 atol: float = 0.0) -> RoundSelection:
    """One rollout round of dynamic sampling. `missing`: samples the batch still lacks before this round.
    Keeps the informative groups; on the last round, tops up with the first uninformative groups (in rollout
    order) until `missing` samples are there."""
    ok = informative_groups(rewards, group_size, atol)  # (num_groups,)
    keep = ok.clone()
    topped_up = 0
    if last_round:
        short = max(0, missing - int(ok.sum()) * group_size)
        for g in (~ok).nonzero().flatten().tolist()[: -(-short // group_size)]:  # ceil(short / G) groups
            keep[g] = True
            topped_up += 1
    return RoundSelection(keep.repeat_interleave(group_size), int((~ok).sum()) - topped_up, topped_up)
