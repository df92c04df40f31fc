"""One rank of the vocab-parallel equivalence test (spawned by test_kernels_vocab_parallel.py).

Every rank builds the same full [T, V] logits, runs the unsharded kernel on them, then runs the
vocab-parallel kernel on its own [T, V/tp] slice with a gloo TP group, and checks outputs, the dlogits
slice and the temperature gradient against the unsharded call. Any mismatch raises in the rank,
which torch.multiprocessing.spawn turns into a test failure with the rank's traceback.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

T = 21
V_SHARD = 301  # odd: the vocab block (1024 interpreted, 4096 compiled) always has a masked tail
SEED = 5


def _problem(world: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(SEED)
    V = V_SHARD * world
    logits = (torch.randn(T, V, generator=g) * 4).to(dtype)
    logits[0, V - 1] = 1e4  # row max in the last shard; target in the first
    logits[1, 0] = 1e4  # row max in the first shard; target in the last
    targets = torch.randint(0, V, (T,), generator=g)
    targets[0], targets[1], targets[2] = 0, V - 1, -100
    targets[3] = V_SHARD  # first column of shard 1 (boundary)
    targets[4] = V_SHARD - 1  # last column of shard 0 (boundary)
    up = torch.randn(3, T, generator=g)  # upstream grads for logprobs / entropy / loss
    return logits, targets, up


def _grads(fn, logits, temp0: float, upstream):
    x = logits.clone().requires_grad_(True)
    temp = torch.tensor(temp0, requires_grad=True)
    outs = fn(x, temp)
    sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
    return [o.detach() for o in outs], x.grad, temp.grad


def run_rank(rank: int, world: int, init_file: str, dtype_name: str) -> None:
    from kernels import fused_grpo_loss, fused_logprob_entropy, logprob_entropy_reference
    from kernels_testlib import GRAD_TOL, OUTPUT_TOL, TEMPERATURE_GRAD_TOL, assert_close

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tp_group = dist.new_group(ranks=list(range(world)))
        dtype = getattr(torch, dtype_name)
        logits, targets, up = _problem(world, dtype)
        cols = slice(rank * V_SHARD, (rank + 1) * V_SHARD)
        shard = logits[:, cols].contiguous()

        def lpe(group):
            return lambda x, t: fused_logprob_entropy(x, targets, t, tp_group=group)

        full_out, full_dx, full_dt = _grads(lpe(None), logits, 0.8, up[:2])
        tp_out, tp_dx, tp_dt = _grads(lpe(tp_group), shard, 0.8, up[:2])
        for name, a, b in zip(("logprobs", "entropy"), tp_out, full_out):
            assert_close(f"rank{rank} {name}", a, b, **OUTPUT_TOL)
        assert bool((tp_out[0] <= 0).all())
        assert_close(f"rank{rank} dlogits shard", tp_dx, full_dx[:, cols], **GRAD_TOL[dtype])
        assert_close(f"rank{rank} dtemperature", tp_dt, full_dt, **TEMPERATURE_GRAD_TOL)

        with torch.no_grad():
            lp, _ = logprob_entropy_reference(logits, targets, 0.8)
        g = torch.Generator().manual_seed(SEED + 1)
        old = lp + 0.4 * torch.randn(T, generator=g)
        ref = lp + 0.4 * torch.randn(T, generator=g)
        adv = torch.randn(T, generator=g)
        mask = (torch.rand(T, generator=g) > 0.2).float()

        def grpo(group):
            def fn(x, t):
                loss, st = fused_grpo_loss(x, targets, old, adv, mask, ref, dual_clip_c=3.0, kl_coef=0.1,
                                           kl_type="k3", temperature=t, tp_group=group)
                return loss, st["ratio"], st["kl"], st["clipped_low"], st["clipped_high"]
            return fn

        full_out, full_dx, full_dt = _grads(grpo(None), logits, 0.8, up[2:])
        tp_out, tp_dx, tp_dt = _grads(grpo(tp_group), shard, 0.8, up[2:])
        for name, a, b in zip(("loss", "ratio", "kl"), tp_out, full_out):
            assert_close(f"rank{rank} grpo {name}", a, b, **OUTPUT_TOL)
        for name, a, b in zip(("clipped_low", "clipped_high"), tp_out[3:], full_out[3:]):
            assert torch.equal(a, b), f"rank{rank} grpo {name} differs"
        assert_close(f"rank{rank} grpo dlogits shard", tp_dx, full_dx[:, cols], **GRAD_TOL[dtype])
        assert_close(f"rank{rank} grpo dtemperature", tp_dt, full_dt, **TEMPERATURE_GRAD_TOL)
    finally:
        dist.destroy_process_group()
