"""Token log-probabilities from vocab-parallel logits: the fused Triton kernel or the torch reference.

The [T, V] logits are never upcast to fp32 as a whole on the fused path; the reference path is
megatron's vocab-parallel cross entropy (exact, upcasts), kept behind `train.loss_impl=reference`.
"""

from __future__ import annotations

import torch

from kernels.reference import IGNORE_INDEX


def valid_vocab_columns(local_vocab: int, vocab_size: int, tp_group) -> int:
    """How many of this rank's vocab columns are real tokens (the rest is TP padding)."""
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    return max(0, min(local_vocab, vocab_size - rank * local_vocab))


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None, tp_group) -> torch.Tensor:
    """(b, s, V/tp) -> (T, V/tp) view with this rank's TP-padding columns set to -inf, in place (no copy: the
    output layer's backward does not need its output)."""
    b, s, v = logits.shape
    flat = logits.reshape(b * s, v)  # (T, V/tp)
    valid = v if vocab_size is None else valid_vocab_columns(v, vocab_size, tp_group)
    if valid < v:
        flat[:, valid:] = float("-inf")
    return flat


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, tp_group, impl: str = "fused",
                   temperature: float = 1.0, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (b, s, V/tp) vocab-parallel, labels (b, s) -> (logprobs (b, s) fp32, entropy (b, s) or None).

    Columns past `vocab_size` (padding for TP) are excluded from the softmax, so the result equals
    the unpadded model's (and transformers') at every TP size.
    """
    b, s, v = logits.shape
    flat_labels = labels.reshape(b * s)
    if impl == "fused":
        from kernels import fused_logprob_entropy

        flat_logits = mask_padded_vocab(logits, vocab_size, tp_group)
        logprobs, entropy = fused_logprob_entropy(flat_logits, flat_labels, temperature=temperature, tp_group=tp_group)
        return logprobs.view(b, s), entropy.view(b, s)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    valid = v if vocab_size is None else valid_vocab_columns(v, vocab_size, tp_group)
    safe = flat_labels.clamp(min=0)
    scaled = logits.reshape(b * s, v).float() / temperature  # the reference path upcasts (a copy) by design
    if valid < v:
        scaled[:, valid:] = float("-inf")
    nll = vocab_parallel_cross_entropy(scaled.unsqueeze(1), safe.unsqueeze(1)).squeeze(1)
    logprobs = torch.where(flat_labels == IGNORE_INDEX, torch.zeros_like(nll), -nll)
    return logprobs.view(b, s), None
