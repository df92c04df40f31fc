"""Plain-torch references (the oracle) for the fused kernels.

They upcast the whole `[T, V]` logits to fp32 and use autograd for every gradient, so they are
simple to read and obviously right, and exactly what the kernels exist to avoid at 152k vocab.
Tests compare the kernels' outputs and gradients against these; the benchmark times them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Target value meaning "no label here": logprob 0, entropy 0, zero gradient (PyTorch/HF convention).
Defined here once; the kernels, engine/train/losses.py and everything else import it."""
LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_old| and |log pi_ref - log pi| are clamped to 20 before exp (e^20 ~ 5e8), as verl's
core_algos does, so one stale token cannot overflow the ratio to inf."""
K3_MAX = 10.0
"""The k3 ("low_var_kl") estimate is clamped to <= 10 per token, as in verl's kl_penalty."""
KL_TYPES = ("k1", "k2", "k3")


def logprob_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) fp32 [T] from logits [T, V]; targets == -100 give 0, 0."""
    x = logits.float()  # [T, V] fp32: the memory the fused kernel saves
    if torch.is_tensor(temperature) and temperature.requires_grad:
        # -inf logits (padded vocab) must stay -inf without a nan d/d temperature (-inf * 0).
        is_inf = torch.isinf(x)
        z = torch.where(is_inf, x, torch.where(is_inf, torch.zeros_like(x), x) / temperature)
    else:
        z = x / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprob = logp.gather(-1, safe_targets[:, None]).squeeze(-1)  # [T]
    p = logp.exp()
    # p = 0 at -inf logits: p * log p -> 0 * -inf = nan, and its gradient too; mask log p first.
    logp_finite = torch.where(p > 0, logp, torch.zeros_like(logp))
    entropy = -(p * logp_finite).sum(-1)
    zeros = torch.zeros_like(logprob)
    return torch.where(valid, logprob, zeros), torch.where(valid, entropy, zeros)


def kl_estimate_reference(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (Schulman's k1 / k2 / k3)."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kl_type == "k3":
        log_ratio = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, max=K3_MAX)
    raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}.")


def grpo_token_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate (+ dual clip, + KL penalty) loss per token from log-probs, all [T]."""
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped_high = (pg_clipped > pg_unclipped) & (advantages > 0)
    clipped_low = (pg_clipped > pg_unclipped) & (advantages < 0)
    dual_clipped = torch.zeros_like(clipped_low)
    if dual_clip_c is not None:
        # Dual-clip PPO (Ye et al. 2020): for A < 0 the loss is bounded by -c * A.
        pg_dual = -advantages * dual_clip_c
        dual_clipped = (advantages < 0) & (pg_dual < pg)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        kl = kl_estimate_reference(logprobs, ref_logprobs, kl_type)
    mask = loss_mask.float()
    loss = (pg + kl_coef * kl) * mask
    stats = {
        "ratio": ratio.detach(),
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "dual_clipped": dual_clipped,
        "kl": kl.detach(),
    }
    return loss, stats


def grpo_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    temperature: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference for `fused_grpo_loss`: per-token loss [T] and the same stats dict.

    Rows without loss (loss_mask 0 or target -100) have loss 0 and all stats 0 / False, as in the kernel,
    which skips them."""
    live = (loss_mask != 0) & (targets != IGNORE_INDEX)
    logprobs, entropy = logprob_entropy_reference(logits, targets, temperature)
    loss_mask = loss_mask.float() * live.float()
    loss, stats = grpo_token_loss_reference(
        logprobs, old_logprobs.float(), advantages.float(), loss_mask,
        None if ref_logprobs is None else ref_logprobs.float(),
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c,
        kl_coef=kl_coef, kl_type=kl_type)
    stats = {"logprobs": logprobs.detach(), "entropy": entropy.detach(), **stats}
    stats = {k: torch.where(live, v, torch.zeros_like(v)) for k, v in stats.items()}
    return loss, stats


def output_layer_logits_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                  vocab_size: int | None = None) -> torch.Tensor:
    """[T, V] logits as the unfused output layer makes them: hidden @ weight^T in their dtype (the GEMM
    accumulates in fp32 and rounds once), restricted to the real vocabulary (rows past `vocab_size` of
    the weight are padding)."""
    logits = hidden @ weight.t()  # [T, V_padded]
    return logits if vocab_size is None else logits[:, :vocab_size]


def linear_logprob_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `fused_linear_logprob_entropy`: the materialised logits, then the logits oracle."""
    return logprob_entropy_reference(output_layer_logits_reference(hidden, weight, vocab_size), targets, temperature)


def linear_grpo_loss_reference(hidden, weight, targets, old_logprobs, advantages, loss_mask, ref_logprobs=None, *,
                               vocab_size: int | None = None, **kwargs):
    """Reference for `fused_linear_grpo_loss`: the materialised logits, then `grpo_loss_reference`."""
    logits = output_layer_logits_reference(hidden, weight, vocab_size)
    return grpo_loss_reference(logits, targets, old_logprobs, advantages, loss_mask, ref_logprobs, **kwargs)
