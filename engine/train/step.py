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


def packed_seq_params_from_segments(segment_ids: torch.Tensor):
    """(b, s) segment ids -> megatron THD PackedSeqParams: every sample (a run of equal ids within a row; a row's
    padding tail is one more) attends only to itself, causally. Built from the host copy of the ids (the
    lengths and max length are read without a device sync); `place_batch` moves cu_seqlens to the GPU."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from engine.data.batch import cu_seqlens_from_segments

    cu, max_len = cu_seqlens_from_segments(segment_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a micro-batch. Rows with `segment_ids` (every training batch: packed SFT
    and MPO rows, GRPO rollout rows) run as THD packed sequences with cu_seqlens from the ids, on both layer
    specs (Transformer Engine's THD attention, our SDPAttention); without segment ids the rows are plainly
    causal. A batch that already carries `packed_seq_params` (forward_step computes them on the host) keeps them."""
    params = batch.get("packed_seq_params")
    if params is None and batch.get("segment_ids") is not None:
        params = packed_seq_params_from_segments(batch["segment_ids"])
    return dict(
        tokens=batch["tokens"],
        position_ids=batch["position_ids"],
        packed_seq_params=params,
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


def nll_loss_factory(tp_group, vocab_size: int, impl: str = "reference", weight=None):
    """weight: the output layer's weight shard, for impl=fused_linear (engine.train.losses.output_weight)."""
    return lambda batch: partial(masked_nll_loss, batch, tp_group, impl, vocab_size, weight=weight)


def forward_backward(model, microbatches: list[dict], pg_collection, loss_factory,
                     forward_only: bool = False) -> list[dict]:
    """Run all micro-batches (1F1B under PP; interleaved 1F1B when `model` is a list of virtual-pipeline chunks).
    Returns each micro-batch's report on the last pipeline stage, [] elsewhere. `loss_factory(batch)` gives the megatron loss function for that micro-batch; it gets
    the batch as placed on the compute device (engine.parallel.device.place_batch), so every stage's loss sees
    device tensors. Micro-batches stay on the host until their forward step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from engine.parallel.device import place_batch

    def forward_step(data_iterator, model):
        host = next(data_iterator)
        if host.get("segment_ids") is not None and host.get("packed_seq_params") is None:
            host = {**host, "packed_seq_params": packed_seq_params_from_segments(host["segment_ids"])}
        batch = place_batch(host)
        return model(**model_inputs(batch)), loss_factory(batch)

    b, s = microbatches[0]["tokens"].shape
    thd = microbatches[0].get("segment_ids") is not None
    for mb in microbatches:  # the pipeline's p2p buffers have one shape for the whole step
        if mb["tokens"].shape != (b, s) or (mb.get("segment_ids") is not None) != thd:
            raise ValueError(f"micro-batches of one step must share their shape and packing: {tuple(mb['tokens'].shape)} "
                             f"vs {(b, s)}")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        # every chunk reads the micro-batches in order (each chunk's forward needs the batch's shapes and ids)
        data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
        model=chunks,
        num_microbatches=len(microbatches),
        # the pipeline's p2p shape: THD runs one packed row of b*s tokens
        seq_length=b * s if thd else s,
        micro_batch_size=1 if thd else b,
        forward_only=forward_only,
    )


def summarize_lm(reports: list[dict]) -> dict:
    """SFT reports -> {'loss', 'loss_sum', 'num_tokens', 'per_token_loss'} of this DP rank."""
    if not reports:
        return {}
    sums = torch.stack([r["lm loss"] for r in reports]).sum(0)
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "loss_sum": float(sums[0]), "num_tokens": int(sums[1]),
            "per_token_loss": [r["per_token_loss"] for r in reports]}
