"""The one entry point from a model's output to per-token log-probs / entropy and the per-token GRPO loss.

`train.loss_impl` picks the implementation, and with it what the model returns:
- `fused`: vocab-parallel logits (b, s, V/tp); the Triton kernels of kernels/logprob_entropy.py and
  kernels/grpo_loss.py read them in their dtype, never upcast [T, V], and write dlogits in place.
- `fused_linear`: the final hidden states (b, s, h) (`prepare_model` switches the output layer, see
  engine/model/output_layer.py); the kernels of kernels/fused_linear_*.py multiply them by the output
  weight (`output_weight(model)`) chunk by chunk, so [T, V] logits never exist.
- `reference`: logits, through megatron's vocab-parallel cross entropy (exact, upcasts; no entropy).

Columns past `vocab_size` (TP padding of the vocab) are excluded from the softmax on every path.
Rows whose `loss_mask` is 0 are skipped on the fused paths (not read / not multiplied): their
log-prob and entropy come back as 0, so pass a mask only where those rows are not used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.reference import IGNORE_INDEX

LOSS_IMPLS = ("fused", "fused_linear", "reference")


# ---------------------------------------------------------------------------------------- the model side
def prepare_model(model, impl: str) -> None:
    """Make `model` (DDP / VLM / GPTModel) return what `impl` consumes: hidden states for fused_linear."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"train.loss_impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl == "fused_linear":
        from engine.model.output_layer import emit_hidden_states

        emit_hidden_states(model)


def output_weight(model, impl: str) -> torch.Tensor | None:
    """The output layer's weight shard the loss needs (fused_linear), else None."""
    if impl != "fused_linear":
        return None
    from engine.model.output_layer import output_weight as weight_of

    return weight_of(model)


# ---------------------------------------------------------------------------------------- helpers
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


def _flat_labels(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """(b, s) labels -> (T,) with IGNORE_INDEX where loss_mask is 0 (the kernels then skip those rows)."""
    flat = labels.reshape(-1)
    if loss_mask is None:
        return flat
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    return torch.where(loss_mask.reshape(-1) != 0, flat, torch.full_like(flat, IGNORE_INDEX))


def _hidden_and_weight(output: torch.Tensor, weight: torch.Tensor | None, impl: str):
    if weight is None:
        raise ValueError("train.loss_impl=fused_linear needs the output layer's weight (engine.train.losses."
                         "output_weight(model, impl)); the model output alone is hidden states, not logits")
    if output.shape[-1] != weight.shape[1]:
        raise ValueError(f"loss_impl={impl}: the model output's last dim {output.shape[-1]} is not the hidden size "
                         f"{weight.shape[1]} of the output weight; was the model prepared with "
                         "engine.train.losses.prepare_model(model, 'fused_linear')?")
    return output.reshape(-1, output.shape[-1])  # (T, h)


def _check_logits_impl(impl: str, weight) -> None:
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if weight is not None:
        raise ValueError(f"an output weight was passed with loss_impl={impl}, which reads logits; the weight "
                         "is only used by loss_impl=fused_linear")


# ---------------------------------------------------------------------------------------- log-probs
def token_logprobs(output: torch.Tensor, labels: torch.Tensor, tp_group, impl: str = "fused",
                   temperature: float = 1.0, vocab_size: int | None = None, *, weight: torch.Tensor | None = None,
                   loss_mask: torch.Tensor | None = None, inplace_backward: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model output -> (logprobs (b, s) fp32, entropy (b, s) or None for `reference`).

    output: logits (b, s, V/tp) vocab-parallel, or hidden states (b, s, h) for impl=fused_linear with
    `weight` = the output layer's (V_padded/tp, h) shard. labels (b, s). loss_mask (b, s): rows where it is
    0 are skipped (0 returned). inplace_backward (impl=fused): dlogits overwrite the logits (only when
    nothing else reads the logits after this loss's backward, as in the training step).
    """
    b, s = labels.shape
    flat_labels = _flat_labels(labels, loss_mask)
    if impl == "fused_linear":
        from kernels import fused_linear_logprob_entropy

        hidden = _hidden_and_weight(output, weight, impl)
        logprobs, entropy = fused_linear_logprob_entropy(hidden, weight, flat_labels, temperature, tp_group,
                                                         vocab_size=vocab_size)
        return logprobs.view(b, s), entropy.view(b, s)
    _check_logits_impl(impl, weight)
    if impl == "fused":
        from kernels import fused_logprob_entropy

        flat_logits = mask_padded_vocab(output, vocab_size, tp_group)
        logprobs, entropy = fused_logprob_entropy(flat_logits, flat_labels, temperature=temperature, tp_group=tp_group,
                                                  inplace_backward=inplace_backward)
        return logprobs.view(b, s), entropy.view(b, s)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    v = output.shape[-1]
    valid = v if vocab_size is None else valid_vocab_columns(v, vocab_size, tp_group)
    safe = flat_labels.clamp(min=0)
    scaled = output.reshape(b * s, v).float() / temperature  # the reference path upcasts (a copy) by design
    if valid < v:
        scaled[:, valid:] = float("-inf")
    nll = vocab_parallel_cross_entropy(scaled.unsqueeze(1), safe.unsqueeze(1)).squeeze(1)
    logprobs = torch.where(flat_labels == IGNORE_INDEX, torch.zeros_like(nll), -nll)
    return logprobs.view(b, s), None


# ---------------------------------------------------------------------------------------- GRPO
def token_grpo_loss(output: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, loss_mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None, *,
                    tp_group, impl: str, vocab_size: int | None, weight: torch.Tensor | None = None,
                    clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip_c: float | None = None,
                    kl_coef: float = 0.0, kl_type: str = "k3", temperature: float = 1.0,
                    inplace_backward: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Model output -> (per-token clipped GRPO loss (b, s) fp32, already times loss_mask; stats of (b, s)).

    output / weight / vocab_size / inplace_backward as in `token_logprobs`; labels, old_logprobs,
    advantages (broadcast per token), loss_mask, ref_logprobs: (b, s). Rows with loss_mask 0 are skipped:
    loss and every stat 0 there. stats: logprobs, entropy, ratio, kl, clipped_low, clipped_high,
    dual_clipped (bool). Reduce with kernels.aggregate_loss or the stage's own aggregation.
    """
    import kernels

    b, s = labels.shape
    flat = [x.reshape(-1) for x in (labels, old_logprobs, advantages, loss_mask)]
    ref = None if ref_logprobs is None else ref_logprobs.reshape(-1)
    kw = dict(clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c, kl_coef=kl_coef,
              kl_type=kl_type, temperature=temperature)
    if impl == "fused_linear":
        hidden = _hidden_and_weight(output, weight, impl)
        per_token, stats = kernels.fused_linear_grpo_loss(hidden, weight, *flat, ref, **kw, tp_group=tp_group,
                                                          vocab_size=vocab_size)
    else:
        _check_logits_impl(impl, weight)
        logits = mask_padded_vocab(output, vocab_size, tp_group)
        if impl == "fused":
            per_token, stats = kernels.fused_grpo_loss(logits, *flat, ref, **kw, tp_group=tp_group,
                                                       inplace_backward=inplace_backward)
        else:
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                raise ValueError("train.loss_impl=reference for GRPO runs at TP=1 only; use loss_impl=fused")
            per_token, stats = kernels.grpo_loss_reference(logits, *flat, ref, **kw)
    return per_token.view(b, s), {k: v.view(b, s) for k, v in stats.items()}
