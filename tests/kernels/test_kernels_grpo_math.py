"""The one GRPO loss, checked by hand: the per-token math of kernels/reference.py (the fused kernel's
oracle), the KL estimators, and kernels/aggregation.py (every mode, packed segments, the TRL options)."""

import math

import pytest
import torch

from kernels import AGGREGATION_MODES, aggregate_loss, aggregate_terms
from kernels.reference import grpo_token_loss_reference, kl_estimate_reference

# Two sequences, three tokens. Row 0 has A = +1, row 1 has A = -1; the ratios are chosen so that each
# bound is hit once: ratio 1.5 with A>0 (upper clip, eps_high=0.28), 0.5 with A<0 (lower clip, eps_low=0.2),
# 4.0 with A<0 (dual clip at c=3).
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 0.5, 4.0]])
ADV = torch.tensor([[1.0] * 3, [-1.0] * 3])


def _token_loss(dual=None):
    old = torch.full((2, 3), -2.0)
    logp = (old + RATIOS.log()).clone().requires_grad_(True)
    loss, stats = grpo_token_loss_reference(logp.flatten(), old.flatten(), ADV.flatten(), torch.ones(6),
                                            clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=dual)
    return logp, loss.view(2, 3), {k: v.view(2, 3) for k, v in stats.items()}


def test_per_token_clipped_loss_and_gradient_by_hand():
    logp, loss, stats = _token_loss()
    # row0: -1·1, max(-1.5, -1.28) = -1.28, max(-0.5, -0.8) = -0.5; row1: 1, max(0.5, 0.8) = 0.8, max(4, 1.28) = 4
    assert loss.tolist()[0] == pytest.approx([-1.0, -1.28, -0.5])
    assert loss.tolist()[1] == pytest.approx([1.0, 0.8, 4.0])
    assert stats["clipped_high"].tolist() == [[False, True, False], [False, False, False]]
    assert stats["clipped_low"].tolist() == [[False, False, False], [False, True, False]]
    logp, dual, stats = _token_loss(dual=3.0)
    assert dual.tolist()[1] == pytest.approx([1.0, 0.8, 3.0])  # min(4.0, -A·c = 3)
    assert stats["dual_clipped"].tolist() == [[False, False, False], [False, False, True]]
    dual.sum().backward()
    # d(-A·ρ)/d logp = -A·ρ where unclipped; clipped and dual-clipped tokens give 0
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.0, -0.5], [1.0, 0.0, 0.0]]), atol=1e-6)


def test_kl_estimators_by_hand_and_unbiased():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # log ratio [0.5, -1.0]
    assert kl_estimate_reference(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate_reference(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_estimate_reference(logp, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    assert float(kl_estimate_reference(torch.tensor([0.0]), torch.tensor([30.0]), "k3")) == 10.0  # capped (verl)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])  # tokens drawn from p: E[k1] = E[k3] = KL
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    true_kl = float((p * (p / q).log()).sum())
    for name in ("k1", "k3"):
        assert float(kl_estimate_reference(p.log()[x], q.log()[x], name).mean()) == pytest.approx(true_kl, abs=5e-3)
    with pytest.raises(ValueError, match="kl_type"):
        kl_estimate_reference(logp, ref, "k4")


def test_kl_term_is_added_with_its_coefficient():
    old = torch.full((4,), -2.0)
    logp, ref = old + 0.1, old + 0.3
    base, _ = grpo_token_loss_reference(logp, old, torch.ones(4), torch.ones(4))
    with_kl, stats = grpo_token_loss_reference(logp, old, torch.ones(4), torch.ones(4), ref, kl_coef=0.1)
    assert torch.allclose(with_kl, base + 0.1 * kl_estimate_reference(logp, ref, "k3"))
    assert torch.allclose(stats["kl"], kl_estimate_reference(logp, ref, "k3"))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last sequence is empty


def test_aggregation_modes_by_hand():
    assert float(aggregate_loss(LOSS, MASK, "token-mean")) == pytest.approx(7 / 3)
    assert float(aggregate_loss(LOSS, MASK, "seq-mean-token-mean")) == pytest.approx((1.5 + 4.0) / 2)
    assert float(aggregate_loss(LOSS, MASK, "seq-mean-token-sum")) == pytest.approx((3.0 + 4.0) / 2)
    assert float(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_length=10)) == pytest.approx(0.7 / 2)
    assert float(aggregate_loss(LOSS, MASK, "token-mean", normalizer=10)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm")


def test_trl_conventions_count_empty_samples():
    """TRL 'grpo': (Σ_t m·l / max(Σ_t m, 1)).mean() over every row; 'dr_grpo': Σ m·l / (rows · L_max)."""
    every_row = torch.ones_like(MASK)
    trl_grpo = float(((LOSS * MASK).sum(1) / MASK.sum(1).clamp(min=1)).mean())
    assert float(aggregate_loss(LOSS, MASK, "seq-mean-token-mean", sample_mask=every_row)) == pytest.approx(trl_grpo)
    dr_grpo = float((LOSS * MASK).sum() / (3 * 10))
    assert float(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", sample_mask=every_row, max_length=10)) \
        == pytest.approx(dr_grpo)


def test_packed_segments_aggregate_per_sample():
    """Row 0 packs samples 1 and 2, row 1 holds sample 1 and padding: the same as three unpacked rows."""
    g = torch.Generator().manual_seed(7)
    loss = torch.randn(2, 6, generator=g)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]])
    unpacked_loss = torch.zeros(3, 4)
    unpacked_mask = torch.zeros(3, 4, dtype=torch.long)
    for r, (row, lo, hi) in enumerate([(0, 0, 3), (0, 3, 6), (1, 0, 4)]):
        unpacked_loss[r, : hi - lo], unpacked_mask[r, : hi - lo] = loss[row, lo:hi], mask[row, lo:hi]
    for mode in AGGREGATION_MODES:
        packed = aggregate_loss(loss, mask, mode, segment_ids=seg, max_length=8)
        assert float(packed) == pytest.approx(float(aggregate_loss(unpacked_loss, unpacked_mask, mode, max_length=8)))
    # per row instead of per sample would weigh row 0's two samples as one sequence: a different number
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) != pytest.approx(
        float(aggregate_loss(loss, mask, "seq-mean-token-mean", segment_ids=seg)))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_microbatch_terms_sum_to_the_full_batch(mode):
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(6, 5, generator=g, requires_grad=True)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    full = aggregate_loss(loss, mask, mode, max_length=5)
    parts = [aggregate_terms(loss[i:i + 2], mask[i:i + 2], mode, max_length=5) for i in (0, 2, 4)]
    total = sum(n for n, _ in parts) / sum(c for _, c in parts)
    assert float(total) == pytest.approx(float(full), rel=1e-6)
    normalised = sum(aggregate_loss(loss[i:i + 2], mask[i:i + 2], mode, normalizer=parts[0][1] + parts[1][1]
                                    + parts[2][1], max_length=5) for i in (0, 2, 4))
    assert float(normalised) == pytest.approx(float(full), rel=1e-6)
    total.backward()
    assert bool((loss.grad[mask == 0] == 0).all()) and bool((loss.grad[mask == 1] != 0).all())
