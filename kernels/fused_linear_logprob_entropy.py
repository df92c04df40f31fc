"""Fused output layer + per-token log-prob / entropy: `hidden [T, H] @ weight[V/tp, H]^T` is never
materialised as `[T, V]`.

    logits    = hidden @ weight^T                          (only ever [C, V/tp] for one chunk of C rows)
    logprobs  = log softmax(logits / temperature)[targets]      entropy = -sum_v p log p

Forward: the rows that have a label (targets != -100) are taken in chunks of C rows; per chunk one
torch matmul makes the chunk's logits in the weight's dtype (exactly the unfused output layer's
product), and the row kernels of `kernels/logprob_entropy.py` turn them into the same online
statistics as the logits path (m, log_s, ez_rel per row; shard partials under TP). Only [T]-sized
statistics and references to `hidden` and `weight` are kept for the backward.

Backward: the chunk's logits are recomputed (one more matmul), the dlogits kernel overwrites them in
place with their gradient, and two matmuls accumulate dhidden[chunk] = dlogits @ weight and
dweight += dlogits^T @ hidden[chunk]. Peak memory above the inputs: one [C, V/tp] chunk, dhidden
[T, H] and dweight [V/tp, H] (accumulated in fp32; see GRAD_WEIGHT_ACCUMULATION) instead of the
logits and dlogits [T, V/tp].

Vocab parallel (tp_group): `weight` is this rank's row shard (rank r: vocab ids [r * V_shard,
(r + 1) * V_shard), megatron's ColumnParallelLinear / VocabParallelEmbedding layout). The shard
partials of all chunks are reduced with the same two all-reduces as the logits path (one MAX, one
SUM of a [3, N] stack), once per call, not per chunk. `hidden` must be the same on every rank
(replicated, as the input of megatron's output layer); its gradient is the sum of every shard's
contribution, so the backward all-reduces dhidden ([T, H]) over tp_group: callers must not reduce
it again (the megatron wiring in engine/model/output_layer.py passes the hidden states through
without `copy_to_tensor_model_parallel_region`).

Padded vocab: `vocab_size` (the real vocabulary) drops the weight rows past it (megatron pads the
vocab to a multiple of 128 x tp): those columns are never computed, which is the same as -inf
logits. Rows without a label are skipped: not multiplied, logprob 0, entropy 0, zero gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from kernels import logprob_entropy as lpe
from kernels._triton_env import INTERPRET, check_device, triton
from kernels.logprob_entropy import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------
# Tuning constants
# ----------------------------------------------------------------------------------------------
MIN_CHUNK_ROWS = 64 if INTERPRET else 128
"""Fewest rows per chunk. GPU: a cuBLAS/CUTLASS GEMM on H100 works in 128-row tiles, so fewer rows
waste the tile (and the matmul is the cost here). Interpreter: one 64-row program (ROWS_PER_PROGRAM)
per chunk and fewer, larger launches (each launch has a fixed interpreter cost)."""
MAX_CHUNK_ROWS = 8192
"""Most rows per chunk: at V/tp = 152064, 8192 rows of bf16 logits are 2.5 GB, the most we let one
chunk take on an 80 GB GPU even when T is huge (the default rule below rarely gets here)."""
GRAD_WEIGHT_ACCUMULATION = torch.float32
"""dweight is summed over chunks in fp32 and rounded once to the weight's dtype at the end, as the
unfused path's single `dlogits^T @ hidden` GEMM does (it accumulates in fp32 inside). Costs a
[V/tp, H] fp32 buffer (2x a bf16 weight shard); accumulating in bf16 would round once per chunk."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_chunk_rows(n_rows: int, v_cols: int, hidden_size: int) -> int:
    """Rows per chunk: Liger's rule, a [C, V] chunk about as large as the [T, H] hidden states
    (C = T / ceil(V / H), so the chunk's memory does not grow with V), to a power of two, clamped."""
    if n_rows == 0:
        return MIN_CHUNK_ROWS
    rows = triton.next_power_of_2(triton.cdiv(n_rows, max(1, triton.cdiv(v_cols, hidden_size))))
    return max(MIN_CHUNK_ROWS, min(rows, MAX_CHUNK_ROWS))


# ----------------------------------------------------------------------------------------------
# Triton kernels: the row kernels of kernels/logprob_entropy.py, run on each [C, V/tp] chunk
# (forward statistics / shard partials, and the dlogits kernel writing in place into the chunk).
# The matmuls are torch's (cuBLAS on GPU): they are the cost, and cuBLAS is the right tool for them.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def check_linear_inputs(hidden, weight, targets, tp_group, vocab_size):
    """Validate; returns (vocab_start, valid columns of this shard, V_total) for this rank."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [T, H] and weight [V_shard, H] (flatten batch and sequence first), "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}.")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H={hidden.shape[1]}] and weight [V_shard, H={weight.shape[1]}] disagree on H.")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype of "
                         f"bf16 / fp16 / fp32 (the output layer's matmul runs in it).")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be [T]={hidden.shape[0]} int64 token ids, got {tuple(targets.shape)} "
                         f"{targets.dtype}.")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
                         "must be on one device.")
    check_device(hidden, "hidden")
    v_shard = weight.shape[0]
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
    v_padded = v_shard * world
    if vocab_size is None:
        vocab_size = v_padded
    if not 0 < vocab_size <= v_padded:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, V_shard x tp = {v_shard} x {world} = {v_padded}].")
    vocab_start = rank * v_shard
    n_valid = max(0, min(v_shard, vocab_size - vocab_start))
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{row}] = {int(targets[row])} is outside the vocabulary [0, {vocab_size}); "
                         f"use {IGNORE_INDEX} for positions without a label.")
    return vocab_start, n_valid


def labelled_rows(targets: torch.Tensor) -> torch.Tensor:
    """Indices [N] of the rows that carry a label (the only rows that are computed)."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


def _chunk_hidden(hidden, rows, start, end, all_rows: bool):
    return hidden[start:end] if all_rows else hidden.index_select(0, rows[start:end])  # [C, H]


def chunked_stats(hidden, weight, n_valid, targets, rows, temperature, tp_group, vocab_start, chunk):
    """(logprob, entropy, m, log_s, ez_rel) fp32 [N] for the labelled `rows`, chunk by chunk."""
    N, T = rows.shape[0], hidden.shape[0]
    dev = hidden.device
    all_rows = N == T
    tgt = targets if all_rows else targets.index_select(0, rows)  # [N]
    w = weight[:n_valid]  # [V_valid, H]: the padded vocab rows are never multiplied
    parts = tuple(torch.empty(N, dtype=torch.float32, device=dev) for _ in range(4 if tp_group else 5))
    if n_valid == 0:  # a TP rank whose whole shard is vocab padding contributes nothing
        m, s, w_sum, z_t = parts
        m.fill_(float("-inf"))
        for zero in (s, w_sum, z_t):
            zero.zero_()
    else:
        buf = torch.empty(min(chunk, N), n_valid, dtype=weight.dtype, device=dev)  # reused per chunk
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            logits = torch.mm(_chunk_hidden(hidden, rows, start, end, all_rows), w.t(), out=buf[: end - start])
            if tp_group is None:
                outs = lpe.logprob_entropy_forward(logits, tgt[start:end], temperature, None, 0)
            else:
                outs = lpe.shard_partials(logits, tgt[start:end], vocab_start, temperature)
            for dst, src in zip(parts, outs):
                dst[start:end] = src
        del buf
    if tp_group is None:
        return parts
    return lpe.reduce_partials(*parts, tgt != IGNORE_INDEX, tp_group)  # the two all-reduces, once


_FP32_OUT_GEMM = {"cuda": True}
"""Whether aten::addmm.dtype_out (bf16/fp16 inputs, fp32 output) works on the device; set False the
first time it raises, after which the fallback below is used."""


def accumulate_matmul_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for a, b in any float dtype, without rounding the product to a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_OUT_GEMM["cuda"]:
        try:  # cuBLAS bf16/fp16 GEMM that accumulates and writes fp32 (aten::addmm.dtype_out)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _FP32_OUT_GEMM["cuda"] = False
            warnings.warn(f"bf16/fp16 GEMM with fp32 output unavailable ({type(e).__name__}: {e}); dweight "
                          "chunks are now rounded to the weight's dtype before the fp32 sum", stacklevel=2)
    if a.is_cuda:  # a bf16 GEMM (fp32 accumulation inside), rounded once per chunk, then summed in fp32
        acc.add_(torch.mm(a, b))
        return
    acc.addmm_(a.float(), b.float())  # CPU has no bf16 -> fp32 GEMM: upcast the chunk (exact)


def chunked_backward(hidden, weight, n_valid, targets, rows, m, log_s, ez_rel, g_lp, g_ent, temperature,
                     vocab_start, tp_group, chunk, need_hidden: bool, need_weight: bool, compute_dtemp: bool):
    """(dhidden [T, H] or None, dweight [V_shard, H] or None, d temperature 0-d or None).

    g_lp / g_ent: upstream gradients [N] of the labelled rows (either may be None)."""
    N, T = rows.shape[0], hidden.shape[0]
    dev = hidden.device
    all_rows = N == T
    tgt = targets if all_rows else targets.index_select(0, rows)
    w = weight[:n_valid]
    grad_h = torch.zeros_like(hidden) if need_hidden else None
    grad_w = None
    if need_weight:
        acc_dtype = torch.promote_types(weight.dtype, GRAD_WEIGHT_ACCUMULATION)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev)
    dtemp = torch.zeros((), dtype=torch.float32, device=dev) if compute_dtemp else None
    if N > 0 and n_valid > 0:
        buf = torch.empty(min(chunk, N), n_valid, dtype=weight.dtype, device=dev)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            h = _chunk_hidden(hidden, rows, start, end, all_rows)  # [C, H]
            logits = torch.mm(h, w.t(), out=buf[: end - start])  # [C, V_valid], recomputed
            dlogits, dt = lpe.logprob_entropy_backward(
                logits, tgt[start:end], m[start:end], log_s[start:end], ez_rel[start:end],
                None if g_lp is None else g_lp[start:end], None if g_ent is None else g_ent[start:end],
                temperature, vocab_start, compute_dtemp, None, out=logits)  # dlogits overwrite the chunk
            if dt is not None:
                dtemp += dt
            if need_hidden:
                dh = torch.mm(dlogits, w)  # [C, H] in the weight's dtype, like the unfused output layer
                if all_rows:
                    grad_h[start:end] = dh
                else:
                    grad_h.index_copy_(0, rows[start:end], dh)
            if need_weight:
                accumulate_matmul_fp32_(grad_w[:n_valid], dlogits.t(), h)  # [V_valid, H]
        del buf
    if tp_group is not None:
        if need_hidden:  # hidden is replicated: its gradient is the sum of every vocab shard's part
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        if compute_dtemp:
            dist.all_reduce(dtemp, op=dist.ReduceOp.SUM, group=tp_group)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return grad_h, grad_w, dtemp


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class LinearLogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, vocab_size, chunk_size):
        vocab_start, n_valid = check_linear_inputs(hidden, weight, targets, tp_group, vocab_size)
        temp = lpe.temperature_value(temperature)
        rows = labelled_rows(targets)
        chunk = chunk_size or default_chunk_rows(rows.shape[0], n_valid, hidden.shape[1])
        lp, ent, m, log_s, ez_rel = chunked_stats(hidden, weight, n_valid, targets, rows, temp, tp_group,
                                                  vocab_start, chunk)
        T = hidden.shape[0]
        logprob = torch.zeros(T, dtype=torch.float32, device=hidden.device).index_copy_(0, rows, lp)
        entropy = torch.zeros(T, dtype=torch.float32, device=hidden.device).index_copy_(0, rows, ent)
        ctx.save_for_backward(hidden, weight, targets, rows, m, log_s, ez_rel)
        ctx.temp, ctx.vocab_start, ctx.n_valid, ctx.tp_group, ctx.chunk = temp, vocab_start, n_valid, tp_group, chunk
        ctx.temp_meta = (temperature.shape, temperature.dtype) if torch.is_tensor(temperature) else None
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, rows, m, log_s, ez_rel = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 7
        compute_dtemp = ctx.temp_meta is not None and ctx.needs_input_grad[3]
        g_lp = None if grad_logprob is None else grad_logprob.float().index_select(0, rows)
        g_ent = None if grad_entropy is None else grad_entropy.float().index_select(0, rows)
        grad_h, grad_w, dtemp = chunked_backward(
            hidden, weight, ctx.n_valid, targets, rows, m, log_s, ez_rel, g_lp, g_ent, ctx.temp,
            ctx.vocab_start, ctx.tp_group, ctx.chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            compute_dtemp)
        if dtemp is not None:
            shape, dtype = ctx.temp_meta
            dtemp = dtemp.reshape(shape).to(dtype)
        return grad_h, grad_w, None, dtemp, None, None, None


def fused_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy under softmax(hidden @ weight^T / temperature),
    without materialising the [T, V] logits.

    hidden: [T, H] (bf16 / fp16 / fp32), the same on every TP rank. weight: [V_shard, H] in the same
    dtype, the output layer's (this rank's) vocab shard. targets: [T] int64, -100 = no label (row
    skipped: logprob 0, entropy 0, zero gradient). vocab_size: the real vocabulary when the weight
    carries padding rows past it (None: every row is real). chunk_size: rows per chunk (None: see
    `default_chunk_rows`). temperature: float or 0-d tensor (> 0), differentiable when a tensor.
    Returns (logprobs, entropy), fp32 [T]; differentiable w.r.t. hidden, weight and temperature.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows (or None for the default), got {chunk_size}.")
    return LinearLogprobEntropyFunction.apply(hidden, weight, targets, temperature, tp_group, vocab_size,
                                              chunk_size)
