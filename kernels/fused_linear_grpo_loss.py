"""Fused output layer + clipped GRPO loss: the per-token loss of `kernels/grpo_loss.py` straight from
`hidden [T, H]` and the output weight `[V/tp, H]`, without materialising the `[T, V]` logits.

Forward: the rows that carry loss (loss_mask != 0 and a label) go through the chunked log-prob pass
of `kernels/fused_linear_logprob_entropy.py` (chunk logits by torch matmul, the same online
statistics, one pair of TP all-reduces for all chunks); then the GRPO token epilogue of
`kernels/grpo_loss.py` (ratio, clip, dual clip, KL; also dloss/dlogprob) runs once over those rows.
Backward: grad_logprob = grad_loss * dloss/dlogprob, chained into the chunked recompute backward
(dlogits in place in the chunk buffer, dhidden and dweight by matmul; dhidden all-reduced over TP).

Rows without loss are skipped entirely (never multiplied): loss, stats and gradients are 0 there,
exactly as `fused_grpo_loss` on the materialised logits returns them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import fused_linear_logprob_entropy as fle
from kernels import grpo_loss as grpo
from kernels import logprob_entropy as lpe

# ----------------------------------------------------------------------------------------------
# Tuning constants: the chunking of kernels/fused_linear_logprob_entropy.py (MIN/MAX_CHUNK_ROWS,
# default_chunk_rows) and the elementwise block of kernels/grpo_loss.py; nothing of its own.
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Triton kernels: `_logprob_entropy_fwd_kernel` / `_logprob_entropy_bwd_kernel` per chunk, and
# `_grpo_fwd_kernel` (epilogue mode) over the loss rows; see the files named above.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _scatter(values: torch.Tensor, rows: torch.Tensor, T: int) -> torch.Tensor:
    """[N] values of the computed rows -> [T], zeros elsewhere."""
    out = torch.zeros((T,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class LinearGrpoLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, mask, ref, temperature, tp_group, cfg, vocab_size,
                chunk_size):
        vocab_start, n_valid = fle.check_linear_inputs(hidden, weight, targets, tp_group, vocab_size)
        temp = lpe.temperature_value(temperature)
        rows = fle.labelled_rows(targets)  # the wrapper set targets to -100 wherever mask == 0
        chunk = chunk_size or fle.default_chunk_rows(rows.shape[0], n_valid, hidden.shape[1])
        lp, ent, m, log_s, _ = fle.chunked_stats(hidden, weight, n_valid, targets, rows, temp, tp_group,
                                                 vocab_start, chunk)

        def pick(x):
            return None if x is None else x.index_select(0, rows)

        tgt_n = targets.index_select(0, rows)
        loss, coef, ratio, kl, flags = grpo.grpo_epilogue(tgt_n, lp, pick(old), pick(adv), pick(mask), pick(ref),
                                                          cfg)
        T = hidden.shape[0]
        outs = [_scatter(x, rows, T) for x in (loss, lp, ent, ratio, kl)]
        flags_t = torch.zeros(3, T, dtype=torch.int8, device=hidden.device)
        flags_t[:, rows] = flags
        ctx.save_for_backward(hidden, weight, targets, rows, m, log_s, coef)
        ctx.temp, ctx.vocab_start, ctx.n_valid, ctx.tp_group, ctx.chunk = temp, vocab_start, n_valid, tp_group, chunk
        ctx.temp_meta = (temperature.shape, temperature.dtype) if torch.is_tensor(temperature) else None
        flags_t = flags_t.view(torch.bool)
        ctx.mark_non_differentiable(*outs[1:], flags_t)
        ctx.set_materialize_grads(False)
        return (*outs, flags_t)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        hidden, weight, targets, rows, m, log_s, coef = ctx.saved_tensors
        if grad_loss is None:  # only the (non-differentiable) stats were used
            return (None,) * 12
        compute_dtemp = ctx.temp_meta is not None and ctx.needs_input_grad[7]
        g_lp = grad_loss.float().index_select(0, rows) * coef  # [N]: through the elementwise token loss
        grad_h, grad_w, dtemp = fle.chunked_backward(
            hidden, weight, ctx.n_valid, targets, rows, m, log_s, m, g_lp, None, ctx.temp, ctx.vocab_start,
            ctx.tp_group, ctx.chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1], compute_dtemp)
        if dtemp is not None:
            shape, dtype = ctx.temp_meta
            dtemp = dtemp.reshape(shape).to(dtype)
        return (grad_h, grad_w, None, None, None, None, None, dtemp, None, None, None, None)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped GRPO loss [T] from hidden states and the output weight (no [T, V] logits).

    hidden [T, H] (the same on every TP rank), weight [V_shard, H] (this rank's shard; same dtype),
    targets [T] int64 (-100: no label); old_logprobs, advantages, loss_mask, ref_logprobs: [T] per
    token (not differentiated); GRPO options, temperature and tp_group as in `fused_grpo_loss`;
    vocab_size / chunk_size as in `fused_linear_logprob_entropy`. Rows with loss_mask 0 or target
    -100 are skipped: loss, stats and gradient 0 there (flags False).
    Returns (loss [T] fp32, differentiable w.r.t. hidden, weight and temperature; stats dict of
    detached [T]: logprobs, entropy, ratio, kl, clipped_low, clipped_high, dual_clipped).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows (or None for the default), got {chunk_size}.")
    cfg = grpo.grpo_config(kl_type, kl_coef, ref_logprobs, clip_eps_low, clip_eps_high, dual_clip_c)
    fle.check_linear_inputs(hidden, weight, targets, tp_group, vocab_size)  # every target, also masked ones
    T = hidden.shape[0]
    targets, old, adv, mask, ref = grpo.token_inputs(targets, old_logprobs, advantages, loss_mask, ref_logprobs,
                                                     T, hidden.device)
    loss, lp, ent, ratio, kl, flags = LinearGrpoLossFunction.apply(
        hidden, weight, targets, old, adv, mask, ref, temperature, tp_group, cfg, vocab_size, chunk_size)
    stats = {"logprobs": lp, "entropy": ent, "ratio": ratio, "kl": kl,
             "clipped_low": flags[0], "clipped_high": flags[1], "dual_clipped": flags[2]}
    return loss, stats
