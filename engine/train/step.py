"""One optimizer step's forward/backward over micro-batches with megatron's pipeline schedules.

Losses follow megatron's per-token contract: a loss function returns (summed loss, count, report) and
megatron divides the gradients by the count summed over the whole global batch
(`calculate_per_token_loss`), so the result is the same for any split into micro-batches, DP ranks,
TP or PP. The count is tokens for SFT and pairs for MPO.
"""

from __future__ import annotations

from functools import partial

import torch

from engine.train.losses import token_logprobs


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) segment ids -> (b, 1, s, s) bool mask, True = masked: causal and within a segment."""
    s = segment_ids.shape[1]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # (b, s, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def model_inputs(batch: dict) -> dict:
    seg = batch.get("segment_ids")
    packed = seg is not None and bool((seg > 1).any())
    return dict(
        tokens=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=attention_mask_from_segments(seg) if packed else None,
        pixel_values=batch.get("pixel_values"),
        tiles_per_row=batch.get("tiles_per_row"),
        sample_ids=batch.get("sample_ids"),
    )


def masked_nll_loss(batch, tp_group, impl, vocab_size, output, *, weight=None):
    """SFT: summed NLL over assistant tokens, their count, and what to report.

    output: the model's logits, or its hidden states with impl=fused_linear (`weight`: the output layer's)."""
    logprobs, _ = token_logprobs(output, batch["labels"], tp_group, impl, vocab_size=vocab_size, weight=weight,
                                 loss_mask=batch["loss_mask"], inplace_backward=True)
    mask = batch["loss_mask"].float()
    per_token = -logprobs * mask  # (b, s)
    loss_sum = per_token.sum()
    report = {"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum().detach()]),
              "per_token_loss": per_token.detach()}
    return loss_sum, mask.sum().to(torch.int), report


def sequence_logprobs(batch, tp_group, impl, vocab_size, output, *, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log-probs of the learned (response) tokens and the number of such tokens."""
    logprobs, _ = token_logprobs(output, batch["labels"], tp_group, impl, vocab_size=vocab_size, weight=weight,
                                 loss_mask=batch["loss_mask"], inplace_backward=True)
    mask = batch["loss_mask"].float()
    return (logprobs * mask).sum(dim=1), mask.sum(dim=1)


def nll_loss_factory(tp_group, vocab_size: int, impl: str = "reference", weight=None):
    """weight: the output layer's weight shard, for impl=fused_linear (engine.train.losses.output_weight)."""
    return lambda batch: partial(masked_nll_loss, batch, tp_group, impl, vocab_size, weight=weight)


def forward_backward(model, microbatches: list[dict], pg_collection, loss_factory,
                     forward_only: bool = False) -> list[dict]:
    """Run all micro-batches (1F1B under PP). Returns each micro-batch's report on the last pipeline
    stage, [] elsewhere. `loss_factory(batch)` gives the megatron loss function for that micro-batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(**model_inputs(batch)), loss_factory(batch)

    tokens = microbatches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def summarize_lm(reports: list[dict]) -> dict:
    """SFT reports -> {'loss', 'loss_sum', 'num_tokens', 'per_token_loss'} of this DP rank."""
    if not reports:
        return {}
    sums = torch.stack([r["lm loss"] for r in reports]).sum(0)
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "loss_sum": float(sums[0]), "num_tokens": int(sums[1]),
            "per_token_loss": [r["per_token_loss"] for r in reports]}
