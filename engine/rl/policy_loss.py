"""GRPO/PPO clipped surrogate on per-token log-probs, and loss aggregation.

The math reference for the RL loop and for the fused Triton kernel in `kernels/` (which works
on logits): same conventions — per-token tensors are [B, S], `loss_mask` [B, S] is 1 on response
tokens that count, aggregation modes are named 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'.

Per token, with ratio ρ = exp(clamp(logp - old_logp, ±20)) and advantage A:
  L_clip = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))           (clip-higher when ε_high > ε_low)
  dual clip (c > 1, only where A < 0):  L = min(L_clip, -A c)        (bounds the loss for ρ >> 1)
  plus kl_coef * KL_k(logp, ref_logp) when kl_coef > 0 (k3 clamped at 10 per token, as in verl / the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.rl.kl import K3_MAX, LOG_RATIO_CLAMP, kl_penalty

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _kl_clamp(estimator: str) -> float | None:
    return K3_MAX if estimator == "k3" else None


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask==1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, mode: str = "token-mean",
                   normalizer: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, S] to a scalar.

    token-mean:          Σ_bt m·l / Σ_bt m                     (every token weighs the same)
    seq-mean-token-mean: mean_b [Σ_t m·l / Σ_t m]              (every sequence weighs the same)
    seq-mean-token-sum:  mean_b [Σ_t m·l]                      (Dr.GRPO-style, no length division)
    Sequences with an empty mask are left out of the seq-mean modes' count.
    `normalizer` replaces the local denominator (tokens for token-mean, sequences for the seq modes)
    with a global one, so micro-batches summed under gradient accumulation / DP give the global mean.
    """
    if per_token_loss.shape != loss_mask.shape or per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and loss_mask {tuple(loss_mask.shape)} must both be [B, S]")
    mask = loss_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return masked.sum() / denom
    tokens_per_seq = mask.sum(dim=1)  # (B,)
    has_tokens = (tokens_per_seq > 0).to(per_token_loss.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / tokens_per_seq.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = masked.sum(dim=1)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {list(AGG_MODES)}")
    denom = has_tokens.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (per_seq * has_tokens).sum() / denom


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor            # scalar, aggregated, differentiable
    per_token_loss: torch.Tensor  # [B, S] (policy term + kl_coef * kl), unmasked
    ratio: torch.Tensor           # [B, S] detached
    clip_frac_low: torch.Tensor   # share of masked tokens where the 1-ε_low bound is active (A < 0)
    clip_frac_high: torch.Tensor  # share where the 1+ε_high bound is active (A > 0)
    dual_clip_frac: torch.Tensor  # share where the dual-clip bound -A·c is active
    kl: torch.Tensor              # masked mean KL to the reference (0 without one)
    approx_kl_old: torch.Tensor   # masked mean k3(logp, old_logp): how far this update moved


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2, dual_clip_c: float | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy loss [B, S] and boolean masks of where each bound is active."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # (B,) -> (B, S)
    if not (logp.shape == old_logp.shape == advantages.shape):
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
                         f"{tuple(advantages.shape)} must all be [B, S] (advantages may be [B])")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); use None to disable dual clip")
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # no grad past the clamp
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    active = {
        "low": clip_active & (advantages < 0),
        "high": clip_active & (advantages > 0),
        "dual": torch.zeros_like(clip_active),
    }
    if dual_clip_c is not None:
        dual_bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (dual_bound < loss)
        loss = torch.where(dual, dual_bound, loss)
        active["dual"] = dual
    return loss, active


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, dual_clip_c: float | None = None,
                kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None, kl_estimator: str = "k3",
                agg_mode: str = "token-mean", normalizer: float | None = None) -> PolicyLossOutput:
    """GRPO loss: clipped surrogate (+ kl_coef·KL to the reference), aggregated by `agg_mode`.

    logp [B, S] carries the gradient; old_logp/ref_logp [B, S] are treated as constants.
    kl_coef == 0 needs no reference (ref_logp may be None).
    """
    old_logp = old_logp.detach()
    per_token, active = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high, dual_clip_c)
    mask = loss_mask.to(per_token.dtype)
    kl_mean = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if kl_coef != 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef != 0 needs ref_logp from the reference model; set kl_coef=0 to train without one")
        kl = kl_penalty(logp, ref_logp.detach(), kl_estimator, _kl_clamp(kl_estimator))
        per_token = per_token + kl_coef * kl
        kl_mean = masked_mean(kl.detach(), mask)
    elif ref_logp is not None:
        kl_mean = masked_mean(kl_penalty(logp.detach(), ref_logp.detach(), kl_estimator, _kl_clamp(kl_estimator)), mask)
    with torch.no_grad():
        ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        stats = {k: masked_mean(v.to(per_token.dtype), mask) for k, v in active.items()}
        approx_kl_old = masked_mean(kl_penalty(logp, old_logp, "k3"), mask)
    return PolicyLossOutput(
        loss=aggregate_loss(per_token, loss_mask, agg_mode, normalizer),
        per_token_loss=per_token,
        ratio=ratio,
        clip_frac_low=stats["low"],
        clip_frac_high=stats["high"],
        dual_clip_frac=stats["dual"],
        kl=kl_mean,
        approx_kl_old=approx_kl_old,
    )
