import math

import pytest
import torch

from engine.rl.kl import kl_penalty
from engine.rl.policy_loss import AGG_MODES, aggregate_loss, clipped_surrogate, policy_loss

# Two sequences, three tokens. Row 0 has A = +1, row 1 has A = -1; the ratios are chosen so that each
# bound is hit once: ratio 1.5 with A>0 (upper clip, ε_high=0.28), 0.5 with A<0 (lower clip, ε_low=0.2),
# 4.0 with A<0 (dual clip at c=3).
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 0.5, 4.0]])
ADV = torch.tensor([1.0, -1.0])


def _inputs():
    old = torch.full((2, 3), -2.0)
    logp = (old + RATIOS.log()).clone().requires_grad_(True)
    return logp, old, torch.ones(2, 3)


def test_per_token_clipped_loss_by_hand():
    logp, old, _ = _inputs()
    loss, active = clipped_surrogate(logp, old, ADV, eps_low=0.2, eps_high=0.28)
    # row0: -1·1, max(-1.5, -1.28) = -1.28, max(-0.5, -0.8) = -0.5
    # row1:  1,   max(0.5, 0.8) = 0.8,       max(4.0, 1.28) = 4.0
    assert loss.tolist()[0] == pytest.approx([-1.0, -1.28, -0.5])
    assert loss.tolist()[1] == pytest.approx([1.0, 0.8, 4.0])
    assert active["high"].tolist() == [[False, True, False], [False, False, False]]
    assert active["low"].tolist() == [[False, False, False], [False, True, False]]
    dual, _ = clipped_surrogate(logp, old, ADV, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    assert dual.tolist()[1] == pytest.approx([1.0, 0.8, 3.0])  # min(4.0, -A·c = 3)


def test_policy_loss_value_gradient_and_clip_fractions():
    logp, old, mask = _inputs()
    out = policy_loss(logp, old, ADV, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    assert float(out.loss) == pytest.approx((-1.0 - 1.28 - 0.5 + 1.0 + 0.8 + 3.0) / 6)
    assert float(out.clip_frac_high) == pytest.approx(1 / 6)
    assert float(out.clip_frac_low) == pytest.approx(1 / 6)
    assert float(out.dual_clip_frac) == pytest.approx(1 / 6)
    out.loss.backward()
    # d(-A·ρ)/d logp = -A·ρ where unclipped; clipped and dual-clipped tokens give 0
    expected = torch.tensor([[-1.0, 0.0, -0.5], [1.0, 0.0, 0.0]]) / 6
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert float(out.approx_kl_old) == pytest.approx(float(kl_penalty(logp, old, "k3").mean()), rel=1e-5)


def test_on_policy_ratio_one_gives_minus_advantage_gradient():
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    adv = torch.tensor([0.5, -2.0, 1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    out = policy_loss(logp, logp.detach(), adv, mask, agg_mode="token-mean")
    out.loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum())
    assert float(out.clip_frac_low) == float(out.clip_frac_high) == 0.0


def test_kl_term_added_with_coefficient():
    logp, old, mask = _inputs()
    ref = old + 0.3
    base = policy_loss(logp, old, ADV, mask)
    with_kl = policy_loss(logp, old, ADV, mask, kl_coef=0.1, ref_logp=ref, kl_estimator="k3")
    k3 = kl_penalty(logp.detach(), ref, "k3")
    assert float(with_kl.loss) == pytest.approx(float(base.loss) + 0.1 * float(k3.mean()), rel=1e-6)
    assert float(with_kl.kl) == pytest.approx(float(k3.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, ADV, mask, kl_coef=0.1)


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # last sequence is empty: left out of seq means
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(7 / 3)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((1.5 + 4.0) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx((3.0 + 4.0) / 2)
    assert float(aggregate_loss(loss, mask, "token-mean", normalizer=10)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_microbatches_with_global_normalizer_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    full = aggregate_loss(loss, mask, mode)
    norm = float(mask.sum()) if mode == "token-mean" else 6.0
    parts = sum(aggregate_loss(loss[i:i + 2], mask[i:i + 2], mode, normalizer=norm) for i in (0, 2, 4))
    assert float(parts) == pytest.approx(float(full), rel=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        clipped_surrogate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), dual_clip_c=0.5)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        clipped_surrogate(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1))
    assert math.isfinite(float(policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2)).loss))


@pytest.mark.parametrize("dual,kl_coef,kl", [(None, 0.0, "k3"), (3.0, 0.05, "k3"), (2.0, 0.1, "k1"), (None, 0.1, "k2")])
def test_agrees_with_the_kernel_reference(dual, kl_coef, kl):
    """Same per-token math as kernels/reference.py (the fused kernel's oracle), extreme ratios included."""
    reference = pytest.importorskip("kernels.reference")
    g = torch.Generator().manual_seed(5)
    logp = (torch.randn(4, 9, generator=g) * 3).requires_grad_(True)
    old = torch.randn(4, 9, generator=g) * 3
    old[0, 0] = logp[0, 0].item() - 30.0  # log-ratio past the ±20 clamp
    ref = torch.randn(4, 9, generator=g) * 3
    adv = torch.randn(4, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.2).float()
    ours = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip_c=dual, kl_coef=kl_coef,
                       ref_logp=ref, kl_estimator=kl)
    lp2 = logp.detach().clone().requires_grad_(True)
    theirs, stats = reference.grpo_token_loss_reference(
        lp2, old, adv[:, None].expand(4, 9), mask, ref, clip_eps_low=0.2, clip_eps_high=0.28,
        dual_clip_c=dual, kl_coef=kl_coef, kl_type=kl)
    assert torch.allclose(ours.per_token_loss * mask, theirs, rtol=1e-5, atol=1e-6)
    assert float(ours.clip_frac_high) == pytest.approx(float((stats["clipped_high"].float() * mask).sum() / mask.sum()))
    (ours.per_token_loss * mask).sum().backward()
    theirs.sum().backward()
    assert torch.allclose(logp.grad, lp2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_agrees_with_the_kernels_package(mode):
    grpo_loss = pytest.importorskip("kernels.grpo_loss")
    g = torch.Generator().manual_seed(11)
    loss = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    mask[2] = 0  # an empty sequence
    assert float(aggregate_loss(loss, mask, mode)) == pytest.approx(float(grpo_loss.aggregate_loss(loss, mask, mode)), rel=1e-6)
