import math

import pytest
import torch

from engine.rl.advantages import broadcast_to_tokens, compute_advantages, grpo_advantages, mean_only_advantages


def test_grpo_advantages_match_hand_computation():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3)
    # group 2: rewards 2, 2, 2, 2 -> all zero advantage
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, group_size=4, eps=0.0)
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_biased_std_and_eps():
    rewards = torch.tensor([3.0, 1.0])  # mean 2, population std 1
    adv = grpo_advantages(rewards, 2, eps=0.5, unbiased_std=False)
    assert adv.tolist() == pytest.approx([1 / 1.5, -1 / 1.5])


def test_mean_only_has_no_std_division():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 1.0])  # G=3: means 1/3 and 2
    adv = mean_only_advantages(rewards, 3)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2.0, 3.0, -1.0], abs=1e-6)
    assert compute_advantages("mean_only", rewards, 3).tolist() == adv.tolist()


def test_bad_group_shapes_raise():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="unknown advantage"):
        compute_advantages("gae", torch.zeros(4), 2)


def test_broadcast_to_tokens_masks():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(adv, mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]
    with pytest.raises(ValueError, match="same B"):
        broadcast_to_tokens(adv, mask[:1])
