"""torchrun worker: the vocab-parallel fused-linear kernels equal the unsharded call (run by
test_kernels_fused_linear_tp.py on 2 gloo processes).

Every rank builds the same hidden [T, H] and full weight [V_padded, H], runs the unsharded fused-linear
call (TP=1) and the oracle, then the TP call on its own weight shard, and checks outputs, dhidden
(all-reduced over TP inside the kernel), its dweight shard and d temperature. Two vocab layouts: the
last shard partly vocab padding, and the last shard entirely padding (a rank that contributes nothing).
Any mismatch raises in the rank; torchrun's exit code carries it to the test.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

T, H, V_SHARD = 37, 29, 301  # odd everything; T spans several 16-row chunks
CHUNK = 16


def _problem(world: int, dtype, vocab_size: int, seed: int):
    from kernels_testlib import random_linear_problem

    hidden, weight, targets = random_linear_problem(T, H, V_SHARD * world, dtype, ignore_every=6,
                                                    vocab_size=vocab_size, seed=seed)
    targets[1] = vocab_size - 1  # the last real token (in the last shard that has real tokens)
    targets[2] = min(V_SHARD, vocab_size - 1)  # the first column of shard 1 (or the last real one)
    targets[3] = min(V_SHARD, vocab_size) - 1  # the last column of shard 0 (or the last real one)
    with torch.no_grad():  # make the row max of row 4 sit in the last real column (another shard)
        weight[vocab_size - 1] = (hidden[4] / hidden[4].norm() * 40.0).to(dtype)
    return hidden, weight, targets


def _check_case(rank, world, tp_group, dtype, vocab_size, op: str):
    from kernels import fused_linear_grpo_loss, fused_linear_logprob_entropy, linear_logprob_entropy_reference
    from kernels.reference import grpo_loss_reference, logprob_entropy_reference
    from kernels_testlib import (OUTPUT_TOL, TEMPERATURE_GRAD_TOL, assert_close, assert_matmul_grad_close,
                                 linear_grads, reference_dlogits)

    hidden, weight, targets = _problem(world, dtype, vocab_size, seed=vocab_size)
    cols = slice(rank * V_SHARD, (rank + 1) * V_SHARD)
    g = torch.Generator().manual_seed(1)
    if op == "logprob_entropy":
        upstream = {"logprobs": torch.randn(T, generator=g), "entropy": torch.randn(T, generator=g)}

        def call(group):
            def fn(h, w, t):
                lp, ent = fused_linear_logprob_entropy(h, w, targets, t, group, vocab_size=vocab_size, chunk_size=CHUNK)
                return {"logprobs": lp, "entropy": ent}
            return fn

        def on_logits(logits, t):
            lp, ent = logprob_entropy_reference(logits[:, :vocab_size], targets, t)
            return {"logprobs": lp, "entropy": ent}
        keys = ("logprobs", "entropy")
    else:
        with torch.no_grad():
            lp, _ = linear_logprob_entropy_reference(hidden, weight, targets, 0.8, vocab_size=vocab_size)
        old, ref = lp + 0.5 * torch.randn(T, generator=g), lp + 0.3 * torch.randn(T, generator=g)
        adv, mask = torch.randn(T, generator=g), (torch.rand(T, generator=g) > 0.25).float()
        kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.1, kl_type="k3")
        upstream = {"loss": torch.randn(T, generator=g)}

        def call(group):
            def fn(h, w, t):
                loss, st = fused_linear_grpo_loss(h, w, targets, old, adv, mask, ref, temperature=t, tp_group=group,
                                                  vocab_size=vocab_size, chunk_size=CHUNK, **kw)
                return {"loss": loss, **st}
            return fn

        def on_logits(logits, t):
            return {"loss": grpo_loss_reference(logits[:, :vocab_size], targets, old, adv, mask, ref, temperature=t,
                                                **kw)[0]}
        keys = ("loss", "logprobs", "entropy", "ratio", "kl")

    temp = torch.tensor(0.8)
    full, full_dh, full_dw, full_dt = linear_grads(call(None), hidden, weight, temp, upstream)
    shard_weight = weight[cols].contiguous()
    got, got_dh, got_dw, got_dt = linear_grads(call(tp_group), hidden, shard_weight, temp, upstream)
    where = f"rank{rank} {op} {dtype} vocab_size={vocab_size}"
    for key in keys:
        assert_close(f"{where} {key}", got[key], full[key], **OUTPUT_TOL)
    if op == "grpo_loss":
        for flag in ("clipped_low", "clipped_high", "dual_clipped"):
            assert torch.equal(got[flag], full[flag]), f"{where} {flag}"
    dz = reference_dlogits(on_logits, hidden, weight, temp, upstream).abs().double()  # [T, V_padded]
    assert_matmul_grad_close(f"{where} dhidden", got_dh, full_dh, dz @ weight.double().abs(), dtype)
    assert_matmul_grad_close(f"{where} dweight shard", got_dw, full_dw[cols], dz[:, cols].t() @ hidden.double().abs(),
                             dtype)
    assert_close(f"{where} dtemperature", got_dt, full_dt, **TEMPERATURE_GRAD_TOL)
    if rank * V_SHARD >= vocab_size:  # a shard that is all padding: nothing of it is ever used
        assert bool((got_dw == 0).all()), where


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_group = dist.new_group(list(range(world)))
    try:
        dtypes = [getattr(torch, name) for name in sys.argv[1:]] or [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            for vocab_size in (V_SHARD * world - 45, V_SHARD - 20):  # last shard partly / entirely padding
                for op in ("logprob_entropy", "grpo_loss"):
                    _check_case(rank, world, tp_group, dtype, vocab_size, op)
        print(f"rank{rank}: ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
