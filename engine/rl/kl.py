"""KL estimators between the policy and a reference, from per-token log-probs (Schulman's k1/k2/k3).

With log_ratio = logp - ref_logp (tokens sampled from the policy):
  k1 = log_ratio                         unbiased, high variance, can be negative
  k2 = 0.5 * log_ratio**2                biased, low variance, >= 0
  k3 = exp(-log_ratio) + log_ratio - 1   unbiased, low variance, >= 0 ("low_var_kl" in verl);
                                         log_ratio clamped to +-20 before exp
All return per-token values [B, S]; masking/aggregation is the caller's (policy_loss.aggregate_loss).
"""

from __future__ import annotations

from typing import Callable

import torch

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: dict[str, KLFn] = {}


def register_kl(name: str):
    def wrap(fn: KLFn) -> KLFn:
        KL_ESTIMATORS[name] = fn
        return fn

    return wrap


@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp).square()


LOG_RATIO_CLAMP = 20.0  # |log ratio| <= 20 before exp (e^20 ~ 5e8), as verl and kernels/reference.py: no inf
K3_MAX = 10.0           # policy_loss clamps k3 at 10 per token, as verl's low_var_kl and the fused kernel do


@register_kl("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    neg_log_ratio = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(neg_log_ratio) - neg_log_ratio - 1.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate by name; `clamp` bounds it to [-clamp, clamp] (verl clamps k3 at 10)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    kl = KL_ESTIMATORS[estimator](logp, ref_logp)
    return kl.clamp(-clamp, clamp) if clamp is not None else kl
