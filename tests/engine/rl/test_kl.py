import math

import pytest
import torch

from engine.rl.kl import KL_ESTIMATORS, kl_penalty


def test_estimators_match_formulas_on_numbers():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # log_ratio = logp - ref = [0.5, -1.0]
    assert kl_penalty(logp, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k2").tolist()[0] == pytest.approx([0.125, 0.5])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl_penalty(logp, ref, "k3").tolist()[0] == pytest.approx(k3)


def test_k3_nonnegative_and_zero_at_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())
    assert kl_penalty(logp, logp, "k3").abs().max() == 0


def test_k1_k3_unbiased_for_true_kl():
    # tokens sampled from p: E_p[k1] = E_p[k3] = KL(p || q)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    assert float(kl_penalty(logp, logq, "k1").mean()) == pytest.approx(true_kl, abs=5e-3)
    assert float(kl_penalty(logp, logq, "k3").mean()) == pytest.approx(true_kl, abs=5e-3)


def test_clamp_and_errors():
    assert float(kl_penalty(torch.tensor([0.0]), torch.tensor([30.0]), "k3", clamp=10.0)) == 10.0
    with pytest.raises(ValueError, match="unknown KL"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
