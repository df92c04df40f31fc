"""Overlong policy: a response cut at the length limit keeps its reward, scores 0, or leaves the loss."""

import torch

from engine.rl.overlong import apply_overlong_reward, overlong_loss_keep

TOTAL = torch.tensor([1.0, 0.75, 0.25, 1.0])
COMPONENTS = {"accuracy": torch.tensor([1.0, 1.0, 0.0, 1.0]), "format": torch.tensor([1.0, 0.5, 0.5, 1.0])}
FINISHED = torch.tensor([True, False, True, False])


def test_keep_and_mask_leave_rewards_as_scored():
    for policy in ("keep", "mask"):
        total, comps = apply_overlong_reward(policy, TOTAL, COMPONENTS, FINISHED)
        assert torch.equal(total, TOTAL) and all(torch.equal(comps[k], COMPONENTS[k]) for k in COMPONENTS)


def test_zero_reward_zeroes_total_and_every_component_of_cut_responses():
    total, comps = apply_overlong_reward("zero_reward", TOTAL, COMPONENTS, FINISHED)
    assert total.tolist() == [1.0, 0.0, 0.25, 0.0]
    assert comps["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert comps["format"].tolist() == [1.0, 0.0, 0.5, 0.0]
    assert TOTAL.tolist() == [1.0, 0.75, 0.25, 1.0]  # inputs untouched


def test_only_mask_drops_cut_responses_from_the_loss():
    assert overlong_loss_keep("mask", FINISHED).tolist() == [True, False, True, False]
    assert overlong_loss_keep("keep", FINISHED).all() and overlong_loss_keep("zero_reward", FINISHED).all()
