"""One optimizer step's forward/backward over micro-batches with megatron's pipeline schedules.

The loss is the masked next-token NLL over assistant tokens, summed; megatron divides the gradients by
the number of loss tokens of the whole global batch (`calculate_per_token_loss`), so the result is the
same for any split into micro-batches, DP ranks, TP or PP.
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


def masked_nll_loss(labels, loss_mask, tp_group, impl, vocab_size, logits):
    """megatron loss_func contract: (summed loss, number of tokens, values to report)."""
    logprobs, _ = token_logprobs(logits, labels, tp_group, impl, vocab_size=vocab_size)
    mask = loss_mask.float()
    per_token = -logprobs * mask  # (b, s)
    loss_sum = per_token.sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum().detach()]), "per_token_loss": per_token.detach()}
    return loss_sum, num_tokens, report


def make_forward_step(tp_group, vocab_size: int, loss_impl: str = "reference"):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(**model_inputs(batch))
        return output, partial(masked_nll_loss, batch["labels"], batch["loss_mask"], tp_group, loss_impl, vocab_size)

    return forward_step


def forward_backward(model, microbatches: list[dict], pg_collection, vocab_size: int,
                     loss_impl: str = "reference", forward_only: bool = False) -> dict:
    """Run all micro-batches (1F1B under PP). Returns {'loss', 'num_tokens', 'per_token_loss'} on the
    last pipeline stage, {} elsewhere. `loss` is the token-mean over all micro-batches of this DP rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = microbatches[0]["tokens"]
    fb = get_forward_backward_func()
    reports = fb(
        forward_step_func=make_forward_step(pg_collection.tp, vocab_size, loss_impl),
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )
    if not reports:
        return {}
    sums = torch.stack([r["lm loss"] for r in reports]).sum(0)
    return {
        "loss": float(sums[0] / sums[1].clamp(min=1)),
        "loss_sum": float(sums[0]),
        "num_tokens": int(sums[1]),
        "per_token_loss": [r["per_token_loss"] for r in reports],
    }
