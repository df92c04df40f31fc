"""fused_grpo_loss vs the torch oracle: every clip branch, each KL type, grads; aggregate_loss."""

import math

import pytest
import torch

from kernels import aggregate_loss, fused_grpo_loss, grpo_loss_reference, logprob_entropy_reference
from kernels_testlib import OUTPUT_TOL, compare_impl_to_reference, random_logits, random_targets

EPS_LOW, EPS_HIGH, DUAL_C = 0.2, 0.28, 3.0  # asymmetric clip (DAPO "clip-higher") to tell bounds apart
# Target ratios pi/pi_old per token, chosen to land in every branch (and away from exact ties):
# below 1-eps_low, inside, above 1+eps_high, far above (dual clip when A < 0 and ratio > 3),
# and one log-ratio past the +-20 clamp.
RATIOS = [0.5, 0.7, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, math.exp(25.0), math.exp(-25.0)]
STAT_KEYS = ("logprobs", "entropy", "ratio", "kl")


def _branch_batch(dtype, V=300, temperature=1.0):
    """Logits plus old/ref log-probs that put each token's ratio at a chosen value, for A = +-1."""
    n = len(RATIOS)
    T = 2 * n + 2  # every ratio with A > 0 and A < 0, plus one masked and one ignored token
    logits = random_logits(T, V, dtype, seed=11)
    targets = random_targets(T, V, seed=12)
    targets[-1] = -100
    with torch.no_grad():
        lp, _ = logprob_entropy_reference(logits, targets, temperature)
    log_r = torch.tensor([math.log(r) for r in RATIOS] * 2 + [0.1, 0.1])
    old = lp - log_r
    adv = torch.tensor([1.0] * n + [-1.0] * n + [1.0, 1.0]) * 0.8
    mask = torch.ones(T)
    mask[-2] = 0.0
    g = torch.Generator().manual_seed(13)
    ref = lp + 0.3 * torch.randn(T, generator=g)
    return logits, targets, old, adv, mask, ref


def _impls(targets, old, adv, mask, ref, **kw):
    def fused(x, temp):
        loss, stats = fused_grpo_loss(x, targets, old, adv, mask, ref, temperature=temp, **kw)
        return {"loss": loss, **stats}

    def reference(x, temp):
        loss, stats = grpo_loss_reference(x, targets, old, adv, mask, ref, temperature=temp, **kw)
        return {"loss": loss, **stats}
    return fused, reference


def _check(logits, targets, old, adv, mask, ref, temperature, **kw):
    fused, reference = _impls(targets, old, adv, mask, ref, **kw)
    g = torch.Generator().manual_seed(14)
    upstream = {"loss": torch.randn(logits.shape[0], generator=g)}
    got = compare_impl_to_reference(fused, reference, logits, temperature, upstream,
                                    ("loss",) + STAT_KEYS)
    want = reference(logits.detach(), temperature)
    for flag in ("clipped_low", "clipped_high", "dual_clipped"):
        assert got[flag].dtype == torch.bool
        assert torch.equal(got[flag], want[flag]), f"{flag}: {got[flag]} vs {want[flag]}"
    assert bool((got["logprobs"] <= 0).all())
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_clip_branch_with_dual_clip(dtype):
    logits, targets, old, adv, mask, ref = _branch_batch(dtype)
    got = _check(logits, targets, old, adv, mask, None, torch.tensor(1.0),
                 clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, dual_clip_c=DUAL_C)
    n = len(RATIOS)
    ratio = got["ratio"]
    pos, neg = slice(0, n), slice(n, 2 * n)
    # The flags say exactly which branch each token took (independent of the oracle):
    assert torch.equal(got["clipped_high"][pos], ratio[pos] > 1 + EPS_HIGH)
    assert torch.equal(got["clipped_low"][neg], ratio[neg] < 1 - EPS_LOW)
    assert torch.equal(got["dual_clipped"][neg], ratio[neg] > DUAL_C)
    assert not got["clipped_low"][pos].any() and not got["clipped_high"][neg].any()
    for name in ("clipped_high", "clipped_low", "dual_clipped"):
        assert got[name].any(), f"no token exercised {name}"
    inside = (ratio[pos] >= 1 - EPS_LOW) & (ratio[pos] <= 1 + EPS_HIGH)
    assert inside.any() and (ratio[pos] < 1 - EPS_LOW).any()  # A > 0 below the range: unclipped
    assert ratio.max().item() == pytest.approx(math.exp(20.0), rel=1e-5)  # the log-ratio clamp
    assert got["loss"][-2:].abs().sum() == 0  # masked token, ignored target


def test_clip_branches_without_dual_clip_and_with_temperature():
    logits, targets, old, adv, mask, ref = _branch_batch(torch.float32, temperature=0.6)
    got = _check(logits, targets, old, adv, mask, None, torch.tensor(0.6),
                 clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH)
    assert not got["dual_clipped"].any()


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_each_estimator(kl_type, dtype):
    logits, targets, old, adv, mask, ref = _branch_batch(dtype)
    got = _check(logits, targets, old, adv, mask, ref, torch.tensor(1.3),
                 clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, kl_coef=0.1, kl_type=kl_type)
    assert got["kl"][:-2].abs().sum() > 0


def test_k3_clamp_region():
    """ref far above pi: k3 would be e^20; verl clamps it to 10 (and then its gradient is 0)."""
    logits, targets, old, adv, mask, ref = _branch_batch(torch.float32)
    with torch.no_grad():
        lp, _ = logprob_entropy_reference(logits, targets)
    ref = lp + torch.linspace(-30.0, 30.0, lp.shape[0])
    got = _check(logits, targets, old, adv, mask, ref, torch.tensor(1.0), kl_coef=0.5, kl_type="k3")
    assert got["kl"].max().item() == 10.0


def test_kl_without_ref_is_an_error_and_bad_kl_type():
    logits, targets, old, adv, mask, ref = _branch_batch(torch.float32)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        fused_grpo_loss(logits, targets, old, adv, mask, None, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_type must be one of"):
        fused_grpo_loss(logits, targets, old, adv, mask, ref, kl_type="k4")
    with pytest.raises(ValueError, match=r"advantages must be \[T\]"):
        fused_grpo_loss(logits, targets, old, adv[:3], mask)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        fused_grpo_loss(logits, targets, old, adv, mask, dual_clip_c=0.5)


def test_checks_catch_a_wrong_clip_bound():
    """A kernel run with eps_high swapped for eps_low must fail against the oracle."""
    logits, targets, old, adv, mask, ref = _branch_batch(torch.float32)
    fused, _ = _impls(targets, old, adv, mask, None, clip_eps_low=EPS_LOW, clip_eps_high=EPS_LOW)
    _, reference = _impls(targets, old, adv, mask, None, clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH)
    upstream = {"loss": torch.ones(logits.shape[0])}
    with pytest.raises(AssertionError, match="loss"):
        compare_impl_to_reference(fused, reference, logits, torch.tensor(1.0), upstream, ("loss",))


# ---- aggregate_loss ----------------------------------------------------------------------------
def _loop_aggregate(loss, mask, mode):
    """Independent, loop-based restatement of the three modes."""
    rows = [(sum(float(l) * float(m) for l, m in zip(lr, mr)), sum(float(m) for m in mr))
            for lr, mr in zip(loss, mask)]
    if mode == "token-mean":
        return sum(s for s, _ in rows) / max(sum(n for _, n in rows), 1.0)
    kept = [(s, n) for s, n in rows if n > 0]
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in kept) / max(len(kept), 1)
    return sum(s for s, _ in kept) / max(len(kept), 1)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_loss_modes(mode):
    g = torch.Generator().manual_seed(21)
    loss = torch.randn(4, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0],   # no loss tokens: left out of the sequence means
                         [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    out = aggregate_loss(loss, mask, mode)
    assert out.item() == pytest.approx(_loop_aggregate(loss.tolist(), mask.tolist(), mode), rel=1e-6)
    out.backward()
    assert bool((loss.grad[~mask] == 0).all()) and bool((loss.grad[mask] != 0).all())


def test_aggregate_loss_errors_and_empty_batch():
    loss = torch.randn(2, 3)
    assert aggregate_loss(loss, torch.zeros(2, 3), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="mode must be one of"):
        aggregate_loss(loss, torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        aggregate_loss(loss.flatten(), torch.ones(6), "token-mean")


def test_grpo_end_to_end_with_aggregation_matches_reference():
    """[B, S] batch -> packed [T] -> fused loss -> aggregate: same scalar and grads as the oracle."""
    B, S, V = 3, 5, 300
    logits = random_logits(B * S, V, torch.bfloat16, seed=31)
    targets = random_targets(B * S, V, seed=32)
    mask = (torch.arange(S)[None, :] < torch.tensor([[5], [3], [1]])).float().flatten()  # [B*S]
    adv = torch.tensor([1.0, -0.5, 0.2]).repeat_interleave(S)  # per-sequence, broadcast to tokens
    with torch.no_grad():
        lp, _ = logprob_entropy_reference(logits, targets)
    old = lp + 0.2 * torch.randn(B * S, generator=torch.Generator().manual_seed(33))
    results = []
    for fn in (fused_grpo_loss, grpo_loss_reference):
        x = logits.clone().requires_grad_(True)
        loss, _ = fn(x, targets, old, adv, mask)
        total = aggregate_loss(loss.view(B, S), mask.view(B, S), "seq-mean-token-mean")  # [T] -> [B, S]
        total.backward()
        results.append((total.detach(), x.grad.float()))
    torch.testing.assert_close(results[0][0], results[1][0], **OUTPUT_TOL)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=2.0**-7)
