"""Fused per-token log-prob and entropy of logits `[T, V]` (or a vocab-parallel shard `[T, V/tp]`).

    logprobs[t] = log softmax(logits[t] / temperature)[targets[t]]          (<= 0)
    entropy[t]  = -sum_v p[t, v] * log p[t, v],  p = softmax(logits[t] / temperature)

Forward: one pass over V in BLOCK_V-wide blocks with an online max / sum-exp (no `[T, V]` fp32
intermediate; the logits are read once in their own dtype and upcast block by block in registers).
Backward: recomputes p from the logits and the saved per-row statistics and writes dlogits in the
logits' dtype, combining grad_logprobs and grad_entropy (and the temperature gradient when asked).

Per-row statistics kept in fp32 (all relative to the row max m, so logits of +-1e4 keep full precision):
    m       row max of z = logits / temperature
    log_s   log sum_v exp(z_v - m)
    ez_rel  E_p[z] - m = (sum_v exp(z_v - m) * (z_v - m)) / s
so that   logprob = (z_target - m) - log_s   and   entropy = log_s - ez_rel.

Gradients, with d = z - m, p = exp(d - log_s):
    dlogprob/dz_v = [v == target] - p_v
    dentropy/dz_v = p_v * (ez_rel - d_v)              (= -p_v (log p_v + H))
    dL/dlogits    = dL/dz / temperature
    dL/dtemperature = -sum_v dL/dz_v * z_v / temperature

Vocab-parallel (tp_group given; megatron `vocab_parallel_cross_entropy` pattern): each rank computes
its shard's partial (m_r, s_r, w_r = sum exp(z - m_r)(z - m_r), z_target or 0), then one all_reduce(MAX)
of m and one all_reduce(SUM) of the rescaled [s, w, z_target] stack give the global statistics; the
backward is then local to each shard (plus one all_reduce of the temperature gradient, if needed).
The target belongs to the rank whose range [rank * V_shard, (rank + 1) * V_shard) holds it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels._triton_env import INTERPRET, check_device, quiet_masked_lanes, tl, triton
from kernels.reference import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------

if INTERPRET:
    # The interpreter's cost is per Triton op per program (numpy does the tile), so big tiles win.
    # Forward at T=256, V=32000 bf16 on the 2-core CI box: 64x1024 0.57 s, 32x1024 1.4 s,
    # 16x256 24 s; 64x4096 was no faster (0.75 s). Tests still hit the masked tails (odd T and V).
    ROWS_PER_PROGRAM = 64
    MAX_BLOCK_V = 1024
    NUM_WARPS = 1  # ignored by the interpreter
else:
    # One row per program, as in Liger's cross-entropy: T >= 4k rows already fill 132 SMs many times
    # over. 4096 fp32 values per block = 16 registers/thread at 8 warps, leaving room for the
    # double-buffered loads. Not tuned on hardware yet (no GPU in the session that wrote this);
    # tools/bench_kernels.py is the place to tune it.
    ROWS_PER_PROGRAM = 1
    MAX_BLOCK_V = 4096
    NUM_WARPS = 8

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_sizes(v_shard: int) -> tuple[int, int]:
    """(rows per program, vocab block width) for a shard of `v_shard` columns."""
    return ROWS_PER_PROGRAM, min(MAX_BLOCK_V, triton.next_power_of_2(v_shard))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def shard_softmax_stats(
    x_ptr, stride_row, rows, row_mask, V_shard, temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Online (m, s, w) over one tile of rows: m = max z, s = sum exp(z-m), w = sum exp(z-m)(z-m).

    Rows outside `row_mask` are never read (m = -inf, s = w = 0); a tile with no row to read skips
    the vocab loop entirely, so ignored / masked rows (padding, prompts) cost no logits traffic."""
    row_off = rows.to(tl.int64) * stride_row  # int64: T * V exceeds 2^31 at T=16k, V=152k
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    w = tl.zeros([BLOCK_T], tl.float32)
    v_end = tl.where(tl.max(row_mask.to(tl.int32), axis=0) > 0, V_shard, 0)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V_shard)
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        z = x.to(tl.float32) / temperature  # [BLOCK_T, BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
        alpha = tl.exp(m - m_ref)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        ed = tl.where(e > 0, e * d, 0.0)  # masked / -inf logits: 0 * -inf would be nan
        # sum_old exp(z - m_new)(z - m_new) = alpha * (w + (m - m_new) * s)
        w = tl.where(s > 0, alpha * (w + (m - m_ref) * s), 0.0) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    return m, s, w


@triton.jit
def load_target_z(x_ptr, tgt_ptr, stride_row, rows, row_mask, vocab_start, V_shard, temperature,
                  IGNORE: tl.constexpr):
    """(valid, in_shard, target column in this shard, z at the target or 0) for a tile of rows."""
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=IGNORE)
    valid = row_mask & (tgt != IGNORE)
    tgt_local = tgt - vocab_start
    in_shard = valid & (tgt_local >= 0) & (tgt_local < V_shard)
    x_t = tl.load(x_ptr + rows.to(tl.int64) * stride_row + tgt_local, mask=in_shard, other=0.0)
    z_t = tl.where(in_shard, x_t.to(tl.float32) / temperature, 0.0)
    return valid, tgt_local, z_t


@triton.jit
def finalize_row_stats(m, s, w, z_t, valid):
    """Global (m, s, w, z_target) -> (logprob, entropy, m, log_s, ez_rel); ignored rows get all 0.

    Ignored rows were never read (m = -inf, s = 0): their statistics are set to 0 so that nothing
    downstream (the backward, the TP reduction) ever sees -inf - -inf."""
    log_s = tl.log(s)
    ez_rel = w / s
    # (z_t - m) <= 0 exactly and log_s >= 0 (s holds exp(0) = 1 for the max); the clamp is a last
    # guard against rounding, never a silent fix (tests assert the unclamped math matches torch).
    logprob = tl.minimum((z_t - m) - log_s, 0.0)
    entropy = log_s - ez_rel
    logprob = tl.where(valid, logprob, 0.0)
    entropy = tl.where(valid, entropy, 0.0)
    m = tl.where(valid, m, 0.0)
    log_s = tl.where(valid, log_s, 0.0)
    ez_rel = tl.where(valid, ez_rel, 0.0)
    return logprob, entropy, m, log_s, ez_rel


@triton.jit
def _logprob_entropy_fwd_kernel(
    x_ptr, tgt_ptr,
    out0_ptr, out1_ptr, out2_ptr, out3_ptr, out4_ptr,
    T, V_shard, vocab_start, stride_row, temperature,
    FINALIZE: tl.constexpr, IGNORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """FINALIZE: writes (logprob, entropy, m, log_s, ez_rel). Else shard partials (m, s, w, z_t)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    valid, tgt_local, z_t = load_target_z(x_ptr, tgt_ptr, stride_row, rows, row_mask, vocab_start,
                                          V_shard, temperature, IGNORE)
    m, s, w = shard_softmax_stats(x_ptr, stride_row, rows, valid, V_shard, temperature,
                                  BLOCK_T, BLOCK_V)
    if FINALIZE:
        logprob, entropy, m, log_s, ez_rel = finalize_row_stats(m, s, w, z_t, valid)
        tl.store(out0_ptr + rows, logprob, mask=row_mask)
        tl.store(out1_ptr + rows, entropy, mask=row_mask)
        tl.store(out2_ptr + rows, m, mask=row_mask)
        tl.store(out3_ptr + rows, log_s, mask=row_mask)
        tl.store(out4_ptr + rows, ez_rel, mask=row_mask)
    else:
        tl.store(out0_ptr + rows, m, mask=row_mask)
        tl.store(out1_ptr + rows, s, mask=row_mask)
        tl.store(out2_ptr + rows, w, mask=row_mask)
        tl.store(out3_ptr + rows, z_t, mask=row_mask)


@triton.jit
def _logprob_entropy_bwd_kernel(
    x_ptr, tgt_ptr, m_ptr, log_s_ptr, ez_rel_ptr, g_lp_ptr, g_ent_ptr, dx_ptr, dtemp_ptr,
    T, V_shard, vocab_start, stride_row, stride_dx_row, temperature,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, COMPUTE_DTEMP: tl.constexpr,
    IGNORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dlogits = (g_lp * (onehot - p) + g_ent * p * (ez_rel - d)) / temperature, recomputing p.

    Ignored rows are not read, only written (zeros). dx_ptr may equal x_ptr (in-place dlogits): each
    tile is loaded before it is stored, by the same program, and no other program touches it."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=IGNORE)
    valid = row_mask & (tgt != IGNORE)
    tgt_local = tgt - vocab_start
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_mask, other=0.0)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    else:
        g_lp = tl.zeros([BLOCK_T], tl.float32)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        ez_rel = tl.load(ez_rel_ptr + rows, mask=row_mask, other=0.0)
    else:
        g_ent = tl.zeros([BLOCK_T], tl.float32)
        ez_rel = tl.zeros([BLOCK_T], tl.float32)
    g_lp = tl.where(valid, g_lp, 0.0)
    g_ent = tl.where(valid, g_ent, 0.0)

    x_off = rows.to(tl.int64) * stride_row
    dx_off = rows.to(tl.int64) * stride_dx_row
    dtemp_acc = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(0, V_shard, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols[None, :] < V_shard)
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask & valid[:, None], other=0.0)
        z = x.to(tl.float32) / temperature  # [BLOCK_T, BLOCK_V]
        d = z - m[:, None]
        p = tl.exp(d - log_s[:, None])
        onehot = tl.where(cols[None, :] == tgt_local[:, None], 1.0, 0.0)
        dz = g_lp[:, None] * (onehot - p)
        if HAS_G_ENT:
            # p = 0 at -inf logits, where (ez_rel - d) = +inf: 0 * inf would be nan
            dz += tl.where(p > 0, g_ent[:, None] * p * (ez_rel[:, None] - d), 0.0)
        dz = tl.where(valid[:, None], dz, 0.0)  # ignored rows: exact zeros, whatever was (not) loaded
        dx = dz / temperature
        tl.store(dx_ptr + dx_off[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DTEMP:
            dtemp_acc += tl.sum(tl.where(mask & (dz != 0), dz * z, 0.0), axis=1)
    if COMPUTE_DTEMP:
        tl.store(dtemp_ptr + rows, dtemp_acc, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def temperature_value(temperature: float | torch.Tensor) -> float:
    """The temperature as a Python float (> 0), for the kernels."""
    value = float(temperature.detach().item() if torch.is_tensor(temperature) else temperature)
    if not value > 0.0:
        raise ValueError(f"temperature must be > 0, got {value}; use 1.0 for plain log-probs.")
    return value


def check_inputs(logits: torch.Tensor, targets: torch.Tensor, tp_group) -> tuple[int, int]:
    """Validate shapes/dtypes/targets; returns (vocab_start, V_total) of this rank's shard."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V] (flatten batch and sequence first), got shape "
                         f"{tuple(logits.shape)}.")
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} not supported; use bf16, fp16 or fp32.")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [T]={logits.shape[0]} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}.")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 token ids (use .long()), got {targets.dtype}.")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}; put both on one device.")
    check_device(logits, "logits")
    v_shard = logits.shape[1]
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
    v_total = v_shard * world
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= v_total))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{row}] = {int(targets[row])} is outside the vocabulary [0, {v_total}) "
                         f"(V_shard={v_shard} x tp={world}); use {IGNORE_INDEX} for positions without a label.")
    return rank * v_shard, v_total


def _grid(T: int, rows_per_program: int) -> tuple[int]:
    return (triton.cdiv(T, rows_per_program),)


def shard_partials(logits, targets, vocab_start, temperature):
    """Per-row partials (m, s, w, z_target) of one vocab shard, fp32 [T] each."""
    T, v_shard = logits.shape
    bt, bv = block_sizes(v_shard)
    m, s, w, z_t = (torch.empty(T, dtype=torch.float32, device=logits.device) for _ in range(4))
    if T > 0:
        with quiet_masked_lanes():
            _logprob_entropy_fwd_kernel[_grid(T, bt)](
                logits, targets, m, s, w, z_t, m, T, v_shard, vocab_start, logits.stride(0), temperature,
                FINALIZE=False, IGNORE=IGNORE_INDEX, BLOCK_T=bt, BLOCK_V=bv, num_warps=NUM_WARPS)
    return m, s, w, z_t


def reduce_partials(m, s, w, z_t, valid, tp_group):
    """all_reduce shard partials into global (logprob, entropy, m, log_s, ez_rel) (megatron pattern).

    Rows that are not `valid` (ignored: never read, m = -inf on every rank) get all-zero statistics."""
    m_global = m.clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=tp_group)
    m_global = torch.where(valid, m_global, torch.zeros_like(m_global))
    alpha = torch.exp(m - m_global)  # shard with m = -inf (all -inf logits, or a skipped row) -> 0
    s_w_zt = torch.stack([  # [3, T]
        alpha * s,
        torch.where(s > 0, alpha * (w + (m - m_global) * s), torch.zeros_like(w)),
        z_t,
    ])
    dist.all_reduce(s_w_zt, op=dist.ReduceOp.SUM, group=tp_group)
    s_g, w_g, z_t_g = s_w_zt.unbind(0)
    zeros = torch.zeros_like(s_g)
    s_g = torch.where(valid, s_g, torch.ones_like(s_g))  # skipped rows: log 1 = 0, 0 / 1 = 0
    log_s = torch.log(s_g)
    ez_rel = w_g / s_g
    logprob = torch.where(valid, torch.clamp((z_t_g - m_global) - log_s, max=0.0), zeros)
    entropy = torch.where(valid, log_s - ez_rel, zeros)
    return logprob, entropy, m_global, log_s, ez_rel


def logprob_entropy_forward(logits, targets, temperature, tp_group, vocab_start):
    """(logprob, entropy, m, log_s, ez_rel), fp32 [T] each; global statistics when sharded."""
    T, v_shard = logits.shape
    if tp_group is not None:
        m, s, w, z_t = shard_partials(logits, targets, vocab_start, temperature)
        return reduce_partials(m, s, w, z_t, targets != IGNORE_INDEX, tp_group)
    bt, bv = block_sizes(v_shard)
    outs = tuple(torch.empty(T, dtype=torch.float32, device=logits.device) for _ in range(5))
    if T > 0:
        with quiet_masked_lanes():
            _logprob_entropy_fwd_kernel[_grid(T, bt)](
                logits, targets, *outs, T, v_shard, 0, logits.stride(0), temperature,
                FINALIZE=True, IGNORE=IGNORE_INDEX, BLOCK_T=bt, BLOCK_V=bv, num_warps=NUM_WARPS)
    return outs


def logprob_entropy_backward(logits, targets, m, log_s, ez_rel, g_lp, g_ent, temperature,
                             vocab_start, compute_dtemp, tp_group, out=None):
    """(dlogits in logits.dtype, d temperature as a 0-d fp32 tensor or None).

    out: where to write dlogits ([T, V_shard], unit column stride); `out=logits` overwrites the
    logits with their gradient in place (no second [T, V] buffer). None allocates a new tensor."""
    T, v_shard = logits.shape
    bt, bv = block_sizes(v_shard)
    if out is None:
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    else:
        if out.shape != logits.shape or out.dtype != logits.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be {tuple(logits.shape)} {logits.dtype} with unit column stride, got "
                             f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
        dlogits = out
    dtemp_rows = torch.empty(T if compute_dtemp else 1, dtype=torch.float32, device=logits.device)
    dummy = m  # never read when the matching HAS_* flag is off
    g_lp_c = g_lp.contiguous() if g_lp is not None else dummy
    g_ent_c = g_ent.contiguous() if g_ent is not None else dummy
    if T > 0:
        with quiet_masked_lanes():
            _logprob_entropy_bwd_kernel[_grid(T, bt)](
                logits, targets, m, log_s, ez_rel, g_lp_c, g_ent_c, dlogits, dtemp_rows,
                T, v_shard, vocab_start, logits.stride(0), dlogits.stride(0), temperature,
                HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None, COMPUTE_DTEMP=compute_dtemp,
                IGNORE=IGNORE_INDEX, BLOCK_T=bt, BLOCK_V=bv, num_warps=NUM_WARPS)
    if not compute_dtemp:
        return dlogits, None
    dtemp = -dtemp_rows[:T].sum() / temperature
    if tp_group is not None:  # the temperature is replicated: its gradient sums every shard's part
        dist.all_reduce(dtemp, op=dist.ReduceOp.SUM, group=tp_group)
    return dlogits, dtemp


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
def check_inplace_allowed(logits: torch.Tensor) -> None:
    """inplace_backward overwrites the logits with dlogits: refuse where autograd would see it."""
    if logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace_backward=True writes dlogits into the logits buffer, but these logits are a leaf "
            "tensor that requires grad (its .grad would alias its data). Use it on logits produced by an "
            "op (the output layer's matmul), or pass inplace_backward=False.")


class InplaceBackwardGuard:
    """Remembers that a backward already overwrote the saved logits (a second one would read dlogits)."""

    @staticmethod
    def consume(ctx) -> None:
        if getattr(ctx, "logits_consumed", False):
            raise RuntimeError(
                "backward ran twice through a call with inplace_backward=True: the first one replaced the "
                "logits by their gradient. Use inplace_backward=False with retain_graph=True.")
        ctx.logits_consumed = True


class LogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, tp_group, inplace_backward):
        vocab_start, _ = check_inputs(logits, targets, tp_group)
        temp = temperature_value(temperature)
        if inplace_backward:
            check_inplace_allowed(logits)
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        logprob, entropy, m, log_s, ez_rel = logprob_entropy_forward(logits, targets, temp, tp_group,
                                                                     vocab_start)
        ctx.save_for_backward(logits, targets, m, log_s, ez_rel)
        ctx.temp, ctx.vocab_start, ctx.tp_group = temp, vocab_start, tp_group
        ctx.inplace_backward = inplace_backward
        ctx.temp_is_tensor = torch.is_tensor(temperature)
        ctx.temp_meta = (temperature.shape, temperature.dtype) if ctx.temp_is_tensor else None
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, targets, m, log_s, ez_rel = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None
        compute_dtemp = ctx.temp_is_tensor and ctx.needs_input_grad[2]
        out = None
        if ctx.inplace_backward and ctx.needs_input_grad[0]:
            InplaceBackwardGuard.consume(ctx)
            out = logits
        dlogits, dtemp = logprob_entropy_backward(
            logits, targets, m, log_s, ez_rel, grad_logprob, grad_entropy, ctx.temp,
            ctx.vocab_start, compute_dtemp, ctx.tp_group, out=out)
        if not ctx.needs_input_grad[0]:
            dlogits = None
        if dtemp is not None:
            shape, dtype = ctx.temp_meta
            dtemp = dtemp.reshape(shape).to(dtype)
        return dlogits, None, dtemp, None, None


def fused_logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    *,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy under softmax(logits / temperature).

    logits: [T, V] (bf16 / fp16 / fp32), or this rank's [T, V/tp] shard when `tp_group` is given
    (rank r holds vocab ids [r * V/tp, (r + 1) * V/tp)). targets: [T] int64, -100 = ignore (those
    rows are not read: logprob 0, entropy 0, zero gradient).
    temperature: float or 0-d tensor (> 0); a tensor that requires grad gets its gradient.
    inplace_backward: write dlogits into the logits' own buffer (halves the loss path's peak memory).
    Only for logits that nothing else reads after this call's backward (e.g. straight out of the
    output layer); a leaf tensor that requires grad is refused, and a second backward raises.
    Returns (logprobs, entropy), fp32 [T]; both differentiable w.r.t. logits.
    """
    return LogprobEntropyFunction.apply(logits, targets, temperature, tp_group, bool(inplace_backward))
