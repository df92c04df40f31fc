"""The GRPO loss of one micro-batch, in megatron's (sum, count, report) contract: the per-token clipped loss
of kernels/ (the fused kernel, or its torch reference with train.loss_impl=reference) reduced by the one
aggregation, kernels.aggregate_terms, per sample (packed segment). megatron sums the counts over the step's
micro-batches and DP ranks and divides the gradients by that total: the step loss is Σ sums / Σ counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.train.losses import mask_padded_vocab, token_logprobs


def token_logprobs_loss(batch, tp_group, vocab_size, temperature, logits):
    """Forward-only: per-token log-probs and entropy of the labels (old / reference policy)."""
    lp, ent = token_logprobs(logits, batch["labels"], tp_group, "fused", temperature, vocab_size)
    return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logprobs": lp, "entropy": ent}


def grpo_loss(batch, tp_group, vocab_size, g, impl, logits):
    """logits (b, s, V/tp) vocab-parallel; batch: a GRPO micro-batch (engine/train/grpo_batch.py) with
    old_logprobs (and ref_logprobs when g.kl_coef > 0); g: algorithm.grpo. Returns (sum, count, report)."""
    import kernels

    b, s, _ = logits.shape
    flat = mask_padded_vocab(logits, vocab_size, tp_group)  # (b*s, V/tp)
    mask = batch["loss_mask"].float()
    ref = batch.get("ref_logprobs")
    args = (flat, batch["labels"].reshape(-1), batch["old_logprobs"].reshape(-1), batch["advantages"].reshape(-1),
            mask.reshape(-1), None if ref is None else ref.reshape(-1))
    kw = dict(clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, dual_clip_c=g.dual_clip_c,
              kl_coef=g.kl_coef, kl_type=g.kl_estimator, temperature=g.temperature)
    if impl == "fused":
        per_token, stats = kernels.fused_grpo_loss(*args, **kw, tp_group=tp_group)
    else:
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            raise ValueError("train.loss_impl=reference for GRPO runs at TP=1 only; use loss_impl=fused")
        per_token, stats = kernels.grpo_loss_reference(*args, **kw)
    loss_sum, count = kernels.aggregate_terms(
        per_token.view(b, s), mask, g.loss_agg_mode, segment_ids=batch["segment_ids"],
        sample_mask=batch["sample_mask"] if g.seq_mean_counts_empty else None, max_length=g.max_response_length)
    flat_mask = mask.reshape(-1)
    report = {
        "loss_sum": loss_sum.detach(), "count": count, "tokens": flat_mask.sum(),
        "clip_low_sum": (stats["clipped_low"].float() * flat_mask).sum(),
        "clip_high_sum": (stats["clipped_high"].float() * flat_mask).sum(),
        "dual_clip_sum": (stats["dual_clipped"].float() * flat_mask).sum(),
        "kl_sum": (stats["kl"] * flat_mask).sum(), "ratio_sum": (stats["ratio"] * flat_mask).sum(),
    }
    return loss_sum, count.to(torch.int), report
