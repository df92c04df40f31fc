"""The GRPO loss of one micro-batch, in megatron's (sum, count, report) contract: the per-token clipped loss
of kernels/ (through engine/train/losses.py: the fused kernel on logits, the kernel fused with the output layer
with train.loss_impl=fused_linear, or the torch reference with loss_impl=reference) reduced by the one
aggregation, kernels.aggregate_terms, per sample (packed segment). megatron sums the counts over the step's
micro-batches and DP ranks and divides the gradients by that total: the step loss is Σ sums / Σ counts.
"""

from __future__ import annotations

import torch

from engine.train.losses import token_grpo_loss, token_logprobs


def token_logprobs_loss(batch, tp_group, vocab_size, temperature, impl, output, *, weight=None):
    """Forward-only: per-token log-probs and entropy of the labels (old / reference policy). output: the logits,
    or the hidden states with impl=fused_linear (`weight`: the output layer's shard); impl=reference is served by
    the fused kernel here (the entropy metrics need it)."""
    impl = "fused" if impl == "reference" else impl
    lp, ent = token_logprobs(output, batch["labels"], tp_group, impl, temperature, vocab_size, weight=weight)
    return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logprobs": lp, "entropy": ent}


def grpo_loss(batch, tp_group, vocab_size, g, impl, output, *, weight=None):
    """output: logits (b, s, V/tp) vocab-parallel, or hidden states (b, s, h) with impl=fused_linear (`weight`:
    the output layer's shard); batch: a GRPO micro-batch (engine/train/grpo_batch.py) with old_logprobs (and
    ref_logprobs when g.kl_coef > 0); g: algorithm.grpo. Returns (sum, count, report)."""
    import kernels

    mask = batch["loss_mask"].float()
    per_token, stats = token_grpo_loss(
        output, batch["labels"], batch["old_logprobs"], batch["advantages"], mask, batch.get("ref_logprobs"),
        tp_group=tp_group, impl=impl, vocab_size=vocab_size, weight=weight, clip_eps_low=g.clip_eps_low,
        clip_eps_high=g.clip_eps_high, dual_clip_c=g.dual_clip_c, kl_coef=g.kl_coef, kl_type=g.kl_estimator,
        temperature=g.temperature, inplace_backward=True)  # the logits are read by nothing after this backward
    loss_sum, count = kernels.aggregate_terms(
        per_token, mask, g.loss_agg_mode, segment_ids=batch["segment_ids"],
        sample_mask=batch["sample_mask"] if g.seq_mean_counts_empty else None, max_length=g.max_response_length)
    report = {
        "loss_sum": loss_sum.detach(), "count": count, "tokens": mask.sum(),
        "clip_low_sum": (stats["clipped_low"].float() * mask).sum(),
        "clip_high_sum": (stats["clipped_high"].float() * mask).sum(),
        "dual_clip_sum": (stats["dual_clipped"].float() * mask).sum(),
        "kl_sum": (stats["kl"] * mask).sum(), "ratio_sum": (stats["ratio"] * mask).sum(),
    }
    return loss_sum, count.to(torch.int), report
