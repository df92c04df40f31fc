"""Logit processing and sampling for the native engine: pure tensor functions over full-vocab logits.

Order (vLLM's and HF's): repetition penalty -> logit bias -> temperature -> top-k -> top-p -> sample.
Greedy (temperature 0) takes the argmax after penalty and bias, so a ban is respected there too.
"""

from __future__ import annotations

import torch

from engine.rollout.base import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF/CTRL rule: for every id already in the prompt or output, logit > 0 -> logit / p, else logit * p.

    logits (B, V) fp32, seen (B, V) bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    vocab = logits.shape[-1]
    bad = [t for t in bias if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"logit_bias names token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set everything outside the top-k / the smallest set with mass >= top_p to -inf. logits (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def processed_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Everything but the draw: penalty, bias, temperature, top-k, top-p. logits (B, V) fp32."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return top_k_top_p_filter(logits, params.top_k, params.top_p)


def sample(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) fp32 raw logits -> (B,) next token ids."""
    logits = processed_logits(logits, seen, params)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if torch.isnan(probs).any():
        raise ValueError("every token is banned for some row (logit_bias / top-k / top-p leave nothing to sample)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
