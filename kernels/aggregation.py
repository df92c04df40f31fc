"""Reduce a per-token GRPO loss to the step loss: the one aggregation the trainer calls (plain torch, not a kernel).

A *sequence* is one sample: a row of a `[B, S]` batch, or with `segment_ids` (packed rows, samples
numbered 1..k per row, 0 in padding: the SFT batch contract of engine/data/batch.py) one (row, segment).
Every mode is a sum over the batch divided by a count, so it splits over micro-batches and data-parallel
ranks (megatron's per-token contract: the loss function returns both, the counts are summed over the
global batch before the gradients are divided):

    mode                       numerator                        count
    token-mean                 Σ m·l                            Σ m                 (DAPO)
    seq-mean-token-mean        Σ_seq Σ_t m·l / Σ_t m            sequences           (original GRPO)
    seq-mean-token-sum         Σ_seq Σ_t m·l                    sequences
    seq-mean-token-sum-norm    Σ_seq Σ_t m·l / max_length       sequences           (Dr.GRPO; TRL's dr_grpo)

m = loss_mask, l = per-token loss. Which sequences count in the seq-mean modes:
  * default: sequences with at least one loss token (a sample with nothing to learn, e.g. an overlong one
    under DAPO filtering, is left out of the mean);
  * `sample_mask` given (1 on every position of a sample, learned or not, 0 in padding): every sample
    counts, an empty one with loss 0 — TRL's convention (`(Σ_t m·l / max(Σ_t m, 1)).mean()` over all rows).
TRL's dr_grpo divides Σ m·l by (rows × max_completion_length): seq-mean-token-sum-norm with
`sample_mask` and max_length = max_completion_length is exactly that.
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _sequence_index(segment_ids: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """Flat [B*S] index of each position's sequence slot, and the number of slots. Without segment_ids a
    row is one sequence; with them slot b*(K+1)+k is segment k of row b (k = 0: the row's padding)."""
    B, S = shape
    if segment_ids is None:
        return torch.arange(B).repeat_interleave(S), B
    if segment_ids.shape != shape:
        raise ValueError(f"segment_ids must be [B, S] like the loss, got {tuple(segment_ids.shape)} for {tuple(shape)}")
    slots = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
    rows = torch.arange(B, device=segment_ids.device)[:, None] * slots  # (B, 1)
    return (rows + segment_ids.long()).reshape(-1), B * slots


def aggregate_terms(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, mode: str, *,
                    segment_ids: torch.Tensor | None = None, sample_mask: torch.Tensor | None = None,
                    max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, count) of a [B, S] per-token loss under `mode` (see the module docstring).

    The numerator is differentiable; the count is a detached float tensor. The loss of a batch is
    numerator / count; of several micro-batches or ranks, Σ numerators / Σ counts.
    """
    if per_token_loss.dim() != 2 or per_token_loss.shape != loss_mask.shape:
        raise ValueError(f"per_token_loss and loss_mask must both be [B, S] (reshape packed [T] "
                         f"tensors per row first), got {tuple(per_token_loss.shape)} and "
                         f"{tuple(loss_mask.shape)}.")
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}.")
    mask = loss_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token-mean":
        return masked.sum(), mask.sum().detach()
    index, slots = _sequence_index(segment_ids, per_token_loss.shape)
    zeros = per_token_loss.new_zeros(slots)
    seq_sum = zeros.index_add(0, index, masked.reshape(-1))  # (slots,) differentiable
    seq_tokens = zeros.detach().index_add(0, index, mask.detach().reshape(-1))
    if sample_mask is None:
        counted = seq_tokens > 0
    else:
        if sample_mask.shape != per_token_loss.shape:
            raise ValueError(f"sample_mask must be [B, S] like the loss, got {tuple(sample_mask.shape)}")
        counted = zeros.detach().index_add(0, index, sample_mask.to(zeros.dtype).reshape(-1)) > 0
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / seq_tokens.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        if not max_length or max_length < 1:
            raise ValueError(f"mode {mode!r} divides by the longest possible response: pass max_length >= 1 "
                             f"(algorithm.grpo.max_response_length), got {max_length}")
        per_seq = seq_sum / float(max_length)
    counted = counted.to(per_token_loss.dtype)
    return (per_seq * counted).sum(), counted.sum()


def aggregate_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, mode: str,
                   normalizer: float | torch.Tensor | None = None, *, segment_ids: torch.Tensor | None = None,
                   sample_mask: torch.Tensor | None = None, max_length: int | None = None) -> torch.Tensor:
    """The scalar loss: numerator / count of `aggregate_terms`, or numerator / `normalizer` when given (the
    count of the whole global batch, so that micro-batch losses sum to the batch loss). A batch with
    nothing to count gives 0 (still differentiable)."""
    numerator, count = aggregate_terms(per_token_loss, loss_mask, mode, segment_ids=segment_ids,
                                       sample_mask=sample_mask, max_length=max_length)
    return numerator / (count.clamp(min=1.0) if normalizer is None else normalizer)
