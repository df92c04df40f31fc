import math

import pytest
import torch

from engine.rl.preference import RewardShift, mpo_loss, mpo_step_loss


def logsig(x):
    return -math.log1p(math.exp(-x))


def _batch():
    pc = torch.tensor([-10.0, -20.0], requires_grad=True)
    pr = torch.tensor([-12.0, -15.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])
    lengths = torch.tensor([5, 10])
    return pc, pr, rc, rr, lengths


def test_mpo_terms_against_hand_computation():
    pc, pr, rc, rr, lengths = _batch()
    out = mpo_loss(pc, pr, rc, rr, lengths, beta=0.1, delta=0.05, w_pref=0.8, w_quality=0.2, w_gen=1.0)
    r_c, r_r = [0.1, -0.1], [-0.1, 0.1]  # β·(π - π0)
    pref = sum(-logsig(c - r) for c, r in zip(r_c, r_r)) / 2
    quality = sum(-logsig(c - 0.05) - logsig(-(r - 0.05)) for c, r in zip(r_c, r_r)) / 2
    gen = (10 / 5 + 20 / 10) / 2
    assert float(out.pref) == pytest.approx(pref, rel=1e-6)
    assert float(out.quality) == pytest.approx(quality, rel=1e-6)
    assert float(out.gen) == pytest.approx(gen, rel=1e-6)
    assert float(out.loss) == pytest.approx(0.8 * pref + 0.2 * quality + 1.0 * gen, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(r_c) and out.rejected_rewards.tolist() == pytest.approx(r_r)
    assert float(out.reward_margin) == pytest.approx(0.0, abs=1e-6)  # (0.2 + -0.2) / 2
    assert float(out.reward_accuracy) == 0.5


@pytest.mark.parametrize("term,weights", [("pref", (1, 0, 0)), ("quality", (0, 1, 0)), ("gen", (0, 0, 1))])
def test_gradient_signs(term, weights):
    pc, pr, rc, rr, lengths = _batch()
    out = mpo_loss(pc, pr, rc, rr, lengths, beta=0.1, delta=0.0, w_pref=weights[0], w_quality=weights[1], w_gen=weights[2])
    out.loss.backward()
    # gradient descent must raise the chosen log-prob (negative gradient) ...
    assert bool((pc.grad < 0).all())
    if term == "gen":
        assert pr.grad is None or bool((pr.grad == 0).all())  # NLL only touches the chosen response
    else:
        assert bool((pr.grad > 0).all())  # ... and lower the rejected one


def test_gen_gradient_is_length_normalised():
    pc, pr, rc, rr, lengths = _batch()
    mpo_loss(pc, pr, rc, rr, lengths, w_pref=0, w_quality=0, w_gen=1).loss.backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 5 / 2, -1 / 10 / 2])


def test_reward_shift_cumulative_and_ema():
    cum = RewardShift()
    assert cum.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert cum.update(torch.tensor([6.0, 6.0, 6.0, 6.0])) == pytest.approx((1 + 3 + 24) / 6)
    ema = RewardShift(momentum=0.9)
    ema.update(torch.tensor([2.0]))
    assert ema.update(torch.tensor([12.0])) == pytest.approx(0.9 * 2 + 0.1 * 12)
    restored = RewardShift(momentum=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.value == ema.value and restored.count == 2 and restored.momentum == 0.9
    with pytest.raises(ValueError):
        RewardShift(momentum=1.0)


def test_step_loss_updates_delta_before_use():
    pc, pr, rc, rr, lengths = _batch()
    shift = RewardShift()
    out = mpo_step_loss(shift, pc, pr, rc, rr, lengths, beta=0.1)
    assert out.delta == pytest.approx(0.0, abs=1e-7)  # mean of [0.1, -0.1, -0.1, 0.1]
    assert shift.count == 4


def test_bad_inputs():
    pc, pr, rc, rr, lengths = _batch()
    with pytest.raises(ValueError, match=r"\[B\]"):
        mpo_loss(pc, pr, rc, rr, torch.tensor([5]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        mpo_loss(pc, pr, rc, rr, torch.tensor([0, 3]))


def test_token_mean_nll_option():
    """nll_norm='token' (TRL's DPO NLL): Σ -log π(y_c) / Σ |y_c|, so every token weighs the same."""
    pc, pr, rc, rr, lengths = _batch()
    out = mpo_loss(pc, pr, rc, rr, lengths, w_pref=0, w_quality=0, w_gen=1, nll_norm="token")
    assert float(out.gen) == pytest.approx((10 + 20) / (5 + 10))
    out.loss.backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 15, -1 / 15])
    with pytest.raises(ValueError, match="nll_norm"):
        mpo_loss(pc, pr, rc, rr, lengths, nll_norm="pair")


def test_reward_shift_running_mean_of_batch_means():
    """TRL's bco_pair: one batch mean per update. A batch of 2 rewards and one of 1 weigh the same."""
    by_batch, by_reward = RewardShift(average="batch_means"), RewardShift()
    for batch in (torch.tensor([1.0, 3.0]), torch.tensor([8.0])):
        by_batch.update(batch)
        by_reward.update(batch)
    assert by_batch.value == pytest.approx((2.0 + 8.0) / 2) and by_reward.value == pytest.approx(12.0 / 3)
    restored = RewardShift()
    restored.load_state_dict(by_batch.state_dict())
    assert restored.update(torch.tensor([5.0])) == pytest.approx((2.0 + 8.0 + 5.0) / 3)
    with pytest.raises(ValueError, match="average"):
        RewardShift(average="median")
