"""Fused GRPO/PPO clipped-surrogate loss straight from logits `[T, V]` (or a vocab-parallel shard).

Per token t (all fp32), with logprob = log softmax(logits / temperature)[target]:
    ratio  = exp(clamp(logprob - old_logprob, -20, 20))
    pg     = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    pg     = min(pg, -c * A)              if dual_clip_c and A < 0     (dual-clip PPO)
    loss   = loss_mask * (pg + kl_coef * D(logprob, ref_logprob))      D in {k1, k2, k3}

Forward: the logprob/entropy pass of `kernels/logprob_entropy.py` with the token math above in the
same kernel's epilogue; it also stores dloss/dlogprob per token (an elementwise function of the
token's own values). Backward: grad_logprob = grad_loss * dloss/dlogprob, chained into the same
recomputing dlogits kernel as the logprob/entropy backward: one read of the logits and one write
of dlogits, no [T, V] fp32 tensor anywhere. Vocab-parallel: the shard partials are all-reduced first
(see logprob_entropy.py), then the same epilogue runs as an elementwise kernel over [T].

Reduce the per-token loss with `kernels.aggregation` (plain torch, per sample or per packed segment).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import logprob_entropy as lpe
from kernels.logprob_entropy import finalize_row_stats, load_target_z, shard_softmax_stats
from kernels._triton_env import quiet_masked_lanes, tl, triton
from kernels.reference import IGNORE_INDEX, K3_MAX, KL_TYPES, LOG_RATIO_CLAMP

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------
ELEMENTWISE_BLOCK = 1024
"""Rows per program for the [T]-sized epilogue in the vocab-parallel path: a plain elementwise op,
1024 fp32 = 4 KB per operand per program (numpy-vectorized in the interpreter)."""
_KL_TYPE_IDS = {name: i + 1 for i, name in enumerate(KL_TYPES)}  # constexpr ids: k1=1, k2=2, k3=3


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def grpo_token_math(lp, old, adv, mask, ref, clip_low, clip_high, dual_c, kl_coef,
                    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                    LR_CLAMP: tl.constexpr, KL_MAX: tl.constexpr):
    """(loss, dloss/dlogprob, ratio, kl, clipped_low, clipped_high, dual_clipped) per token."""
    raw = lp - old
    log_ratio = tl.minimum(tl.maximum(raw, -LR_CLAMP), LR_CLAMP)
    ratio = tl.exp(log_ratio)
    dratio = tl.where((raw >= -LR_CLAMP) & (raw <= LR_CLAMP), ratio, 0.0)  # clamp passes no grad
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    use_clipped = pg_clipped > pg_unclipped  # only possible outside the clip range: zero grad there
    pg = tl.where(use_clipped, pg_clipped, pg_unclipped)
    dpg = tl.where(use_clipped, 0.0, -adv * dratio)
    clipped_high = use_clipped & (adv > 0)
    clipped_low = use_clipped & (adv < 0)
    if HAS_DUAL:
        pg_dual = -adv * dual_c
        dual_clipped = (adv < 0) & (pg_dual < pg)
        pg = tl.where(dual_clipped, pg_dual, pg)
        dpg = tl.where(dual_clipped, 0.0, dpg)
    else:
        dual_clipped = adv != adv  # all False, same shape
    if HAS_REF:
        if KL_TYPE == 1:  # k1 = log pi - log pi_ref
            kl = lp - ref
            dkl = tl.full(lp.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:  # k2 = 0.5 (log pi - log pi_ref)^2
            kl = 0.5 * (lp - ref) * (lp - ref)
            dkl = lp - ref
        else:  # k3 = exp(ref - lp) - (ref - lp) - 1, clamped like verl's low_var_kl
            raw_kl = ref - lp
            lr = tl.minimum(tl.maximum(raw_kl, -LR_CLAMP), LR_CLAMP)
            e = tl.exp(lr)
            k3 = e - lr - 1.0
            kl = tl.minimum(k3, KL_MAX)
            in_range = (raw_kl >= -LR_CLAMP) & (raw_kl <= LR_CLAMP) & (k3 <= KL_MAX)
            dkl = tl.where(in_range, 1.0 - e, 0.0)
        loss = mask * (pg + kl_coef * kl)
        coef = mask * (dpg + kl_coef * dkl)
    else:
        kl = tl.zeros(lp.shape, tl.float32)
        loss = mask * pg
        coef = mask * dpg
    return loss, coef, ratio, kl, clipped_low, clipped_high, dual_clipped


@triton.jit
def _grpo_fwd_kernel(
    x_ptr, tgt_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr,
    loss_ptr, coef_ptr, lp_ptr, ent_ptr, ratio_ptr, kl_ptr, flags_ptr, m_ptr, log_s_ptr,
    T, V, stride_row, temperature, clip_low, clip_high, dual_c, kl_coef,
    FROM_LOGITS: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
    LR_CLAMP: tl.constexpr, KL_MAX: tl.constexpr, IGNORE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """FROM_LOGITS: logprob/entropy pass + token epilogue. Else: epilogue only, lp read from lp_ptr.

    Rows whose target is IGNORE (the wrapper sets it where loss_mask is 0) are skipped: the logits are
    not read, and every output there is 0 (flags False)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    if FROM_LOGITS:
        valid, tgt_local, z_t = load_target_z(x_ptr, tgt_ptr, stride_row, rows, row_mask, 0, V,
                                              temperature, IGNORE)
        m, s, w = shard_softmax_stats(x_ptr, stride_row, rows, valid, V, temperature,
                                      BLOCK_T, BLOCK_V)
        lp, ent, m, log_s, ez_rel = finalize_row_stats(m, s, w, z_t, valid)
        tl.store(lp_ptr + rows, lp, mask=row_mask)
        tl.store(ent_ptr + rows, ent, mask=row_mask)
        tl.store(m_ptr + rows, m, mask=row_mask)
        tl.store(log_s_ptr + rows, log_s, mask=row_mask)
    else:
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=IGNORE)
        valid = row_mask & (tgt != IGNORE)
        lp = tl.load(lp_ptr + rows, mask=row_mask, other=0.0)
    old = tl.load(old_ptr + rows, mask=row_mask, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=row_mask, other=0.0)
    mask = tl.load(mask_ptr + rows, mask=row_mask, other=0.0)
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
    else:
        ref = lp
    loss, coef, ratio, kl, c_low, c_high, c_dual = grpo_token_math(
        lp, old, adv, mask, ref, clip_low, clip_high, dual_c, kl_coef,
        HAS_DUAL, HAS_REF, KL_TYPE, LR_CLAMP, KL_MAX)
    loss = tl.where(valid, loss, 0.0)  # skipped rows: mask is 0 there too; exact zeros regardless
    coef = tl.where(valid, coef, 0.0)
    ratio = tl.where(valid, ratio, 0.0)
    kl = tl.where(valid, kl, 0.0)
    c_low = c_low & valid
    c_high = c_high & valid
    c_dual = c_dual & valid
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(coef_ptr + rows, coef, mask=row_mask)
    tl.store(ratio_ptr + rows, ratio, mask=row_mask)
    tl.store(kl_ptr + rows, kl, mask=row_mask)
    tl.store(flags_ptr + rows, c_low.to(tl.int8), mask=row_mask)  # flags: [3, T] int8
    tl.store(flags_ptr + T + rows, c_high.to(tl.int8), mask=row_mask)
    tl.store(flags_ptr + 2 * T + rows, c_dual.to(tl.int8), mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _token_vector(x: torch.Tensor, name: str, T: int, device) -> torch.Tensor:
    if x.shape != (T,):
        raise ValueError(f"{name} must be [T]={T} (one value per token; broadcast per-sequence values "
                         f"to tokens first), got {tuple(x.shape)}.")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}; put both on one device.")
    return x.detach().float().contiguous()


def grpo_config(kl_type, kl_coef, ref_logprobs, clip_eps_low, clip_eps_high, dual_clip_c) -> dict:
    """Validated GRPO hyper-parameters as the launchers take them."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}.")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs; pass them or set kl_coef=0.")
    if not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got "
                         f"{clip_eps_low}, {clip_eps_high}.")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (typically 3), got {dual_clip_c}; None disables it.")
    return dict(clip_eps_low=float(clip_eps_low), clip_eps_high=float(clip_eps_high),
                dual_clip_c=dual_clip_c, kl_coef=float(kl_coef), kl_type=kl_type)


def token_inputs(targets, old_logprobs, advantages, loss_mask, ref_logprobs, T: int, device):
    """(targets with IGNORE where the loss mask is 0, old, adv, mask, ref) as contiguous fp32 [T].

    A row without loss (mask 0 or an ignored target) becomes an ignored row: the kernels skip it."""
    old = _token_vector(old_logprobs, "old_logprobs", T, device)
    adv = _token_vector(advantages, "advantages", T, device)
    mask = _token_vector(loss_mask, "loss_mask", T, device)
    ref = None if ref_logprobs is None else _token_vector(ref_logprobs, "ref_logprobs", T, device)
    if targets.shape == (T,):
        live = (mask != 0) & (targets != IGNORE_INDEX)
        mask = mask * live  # an unlabeled position never carries loss
        targets = torch.where(live, targets, torch.full_like(targets, IGNORE_INDEX))
    return targets, old, adv, mask, ref


def _launch(logits, targets, old, adv, mask, ref, outs, temperature, cfg, from_logits: bool):
    """One launch of _grpo_fwd_kernel; outs = (loss, coef, lp, ent, ratio, kl, flags, m, log_s)."""
    T = targets.shape[0]
    consts = dict(HAS_DUAL=cfg["dual_clip_c"] is not None, HAS_REF=ref is not None,
                  KL_TYPE=_KL_TYPE_IDS[cfg["kl_type"]], LR_CLAMP=LOG_RATIO_CLAMP, KL_MAX=K3_MAX,
                  IGNORE=IGNORE_INDEX)
    scalars = (temperature, cfg["clip_eps_low"], cfg["clip_eps_high"],
               float(cfg["dual_clip_c"] or 0.0), cfg["kl_coef"])
    ref_arg = ref if ref is not None else old  # never read when HAS_REF is off
    loss, coef, lp, ent, ratio, kl, flags, m, log_s = outs
    if T == 0:
        return
    if from_logits:
        v_shard = logits.shape[1]
        bt, bv = lpe.block_sizes(v_shard)
        grid, blocks, warps = (triton.cdiv(T, bt),), dict(BLOCK_T=bt, BLOCK_V=bv), lpe.NUM_WARPS
        x, stride = logits, logits.stride(0)
    else:  # epilogue only: BLOCK_V is unused, 4 warps cover 1024 elementwise lanes
        grid, blocks, warps = (triton.cdiv(T, ELEMENTWISE_BLOCK),), dict(BLOCK_T=ELEMENTWISE_BLOCK, BLOCK_V=16), 4
        x, stride, v_shard = lp, 0, 0  # x_ptr is never read without FROM_LOGITS
    with quiet_masked_lanes():
        _grpo_fwd_kernel[grid](
            x, targets, old, adv, mask, ref_arg, loss, coef, lp, ent, ratio, kl, flags, m, log_s,
            T, v_shard, stride, *scalars, FROM_LOGITS=from_logits, **consts, **blocks, num_warps=warps)


def grpo_epilogue(targets, lp, old, adv, mask, ref, cfg):
    """The per-token GRPO math on [T] log-probs: (loss, coef = dloss/dlogprob, ratio, kl, flags[3, T])."""
    T = targets.shape[0]
    dev = lp.device
    loss, coef, ratio, kl = (torch.empty(T, dtype=torch.float32, device=dev) for _ in range(4))
    flags = torch.empty(3, T, dtype=torch.int8, device=dev)
    _launch(None, targets, old, adv, mask, ref, (loss, coef, lp, lp, ratio, kl, flags, lp, lp), 1.0, cfg,
            from_logits=False)
    return loss, coef, ratio, kl, flags


def grpo_forward(logits, targets, old, adv, mask, ref, temperature, tp_group, vocab_start, cfg):
    """Returns (loss, coef, logprob, entropy, ratio, kl, flags[3, T] int8, m, log_s)."""
    T = logits.shape[0]
    dev = logits.device
    if tp_group is None:
        outs = tuple(torch.empty(T, dtype=torch.float32, device=dev) for _ in range(6))
        loss, coef, lp, ent, ratio, kl = outs
        flags = torch.empty(3, T, dtype=torch.int8, device=dev)
        m, log_s = (torch.empty(T, dtype=torch.float32, device=dev) for _ in range(2))
        _launch(logits, targets, old, adv, mask, ref, (loss, coef, lp, ent, ratio, kl, flags, m, log_s),
                temperature, cfg, from_logits=True)
    else:
        lp, ent, m, log_s, _ = lpe.logprob_entropy_forward(logits, targets, temperature, tp_group,
                                                            vocab_start)
        loss, coef, ratio, kl, flags = grpo_epilogue(targets, lp, old, adv, mask, ref, cfg)
    return loss, coef, lp, ent, ratio, kl, flags, m, log_s


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class GrpoLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, old, adv, mask, ref, temperature, tp_group, cfg, inplace_backward):
        vocab_start, _ = lpe.check_inputs(logits, targets, tp_group)
        temp = lpe.temperature_value(temperature)
        if inplace_backward:
            lpe.check_inplace_allowed(logits)
        ctx.inplace_backward = inplace_backward
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        loss, coef, lp, ent, ratio, kl, flags, m, log_s = grpo_forward(
            logits, targets, old, adv, mask, ref, temp, tp_group, vocab_start, cfg)
        ctx.save_for_backward(logits, targets, m, log_s, coef)
        ctx.temp, ctx.vocab_start, ctx.tp_group = temp, vocab_start, tp_group
        ctx.temp_meta = (temperature.shape, temperature.dtype) if torch.is_tensor(temperature) else None
        flags = flags.view(torch.bool)
        ctx.mark_non_differentiable(lp, ent, ratio, kl, flags)
        ctx.set_materialize_grads(False)
        return loss, lp, ent, ratio, kl, flags

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits, targets, m, log_s, coef = ctx.saved_tensors
        if grad_loss is None:  # only the (non-differentiable) stats were used
            return (None,) * 10
        compute_dtemp = ctx.temp_meta is not None and ctx.needs_input_grad[6]
        g_lp = grad_loss.float() * coef  # [T]: chain rule through the elementwise token loss
        out = None
        if ctx.inplace_backward and ctx.needs_input_grad[0]:
            lpe.InplaceBackwardGuard.consume(ctx)
            out = logits
        dlogits, dtemp = lpe.logprob_entropy_backward(
            logits, targets, m, log_s, m, g_lp, None, ctx.temp, ctx.vocab_start, compute_dtemp,
            ctx.tp_group, out=out)
        if dtemp is not None:
            shape, dtype = ctx.temp_meta
            dtemp = dtemp.reshape(shape).to(dtype)
        return (dlogits if ctx.needs_input_grad[0] else None,
                None, None, None, None, None, dtemp, None, None, None)


def fused_grpo_loss(
    logits: torch.Tensor,
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
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped GRPO loss [T] (fp32, differentiable w.r.t. logits and temperature) + stats.

    logits [T, V] or this rank's [T, V/tp] shard with `tp_group`; targets [T] int64 (-100: ignored,
    loss 0); old_logprobs, advantages, loss_mask, ref_logprobs: [T] per token (not differentiated).
    Rows with loss_mask 0 or target -100 carry no loss and are skipped (their logits are not read):
    loss, stats and gradient are 0 there (flags False).
    stats (detached, [T]): logprobs, entropy, ratio, kl (zeros without ref_logprobs), and bool flags
    clipped_low (A < 0, ratio < 1 - eps_low), clipped_high (A > 0, ratio > 1 + eps_high), dual_clipped.
    inplace_backward: write dlogits into the logits' buffer (see `fused_logprob_entropy`).
    Reduce with `kernels.aggregation.aggregate_terms` / `aggregate_loss`.
    """
    cfg = grpo_config(kl_type, kl_coef, ref_logprobs, clip_eps_low, clip_eps_high, dual_clip_c)
    lpe.check_inputs(logits, targets, tp_group)  # every target id, also where the mask is 0
    T = logits.shape[0]
    targets, old, adv, mask, ref = token_inputs(targets, old_logprobs, advantages, loss_mask, ref_logprobs, T,
                                                logits.device)
    loss, lp, ent, ratio, kl, flags = GrpoLossFunction.apply(
        logits, targets, old, adv, mask, ref, temperature, tp_group, cfg, bool(inplace_backward))
    stats = {"logprobs": lp, "entropy": ent, "ratio": ratio, "kl": kl,
             "clipped_low": flags[0], "clipped_high": flags[1], "dual_clipped": flags[2]}
    return loss, stats
