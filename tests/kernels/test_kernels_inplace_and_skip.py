"""The logits-input kernels: dlogits written in place into the logits buffer (inplace_backward), and rows
without a label / without loss skipped (never read) — issue 12's "padding and prompts cost little"."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kernels import fused_grpo_loss, fused_logprob_entropy, grpo_loss_reference, logprob_entropy_reference
from kernels.logprob_entropy import ROWS_PER_PROGRAM
from kernels_testlib import GRAD_TOL, OUTPUT_TOL, assert_close, random_logits, random_targets

T, V = 2 * ROWS_PER_PROGRAM + 5, 700  # three row tiles in the interpreter; the first one fully ignored


def _skipping_targets(seed=1):
    targets = random_targets(T, V, ignore_every=3, seed=seed)
    targets[:ROWS_PER_PROGRAM] = -100  # a whole tile (program) without a label: its vocab loop is skipped
    return targets


def _lpe(targets, inplace):
    return lambda x, t: fused_logprob_entropy(x, targets, t, inplace_backward=inplace)


def _grpo(targets, inplace, seed=3):
    g = torch.Generator().manual_seed(seed)
    old, adv, ref = -torch.rand(T, generator=g) * 5, torch.randn(T, generator=g), -torch.rand(T, generator=g) * 5
    mask = (torch.rand(T, generator=g) > 0.4).float()

    def fn(x, t, impl=fused_grpo_loss, **kw):
        loss, st = impl(x, targets, old, adv, mask, ref, kl_coef=0.1, dual_clip_c=3.0, temperature=t, **kw)
        return loss, st["logprobs"], st["ratio"]
    return fn, mask


def _grads_through_an_op(fn, logits, temperature, upstream):
    """Backprop through logits made by an op (as the output layer's are): returns (outs, dlogits, buffer)."""
    base = logits.detach().clone().requires_grad_(True)
    x = base.clone()  # non-leaf: the buffer an in-place backward may overwrite
    outs = fn(x, temperature)
    sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
    return [o.detach() for o in outs], base.grad, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_logprob_entropy(dtype):
    logits, targets = random_logits(T, V, dtype), random_targets(T, V, ignore_every=4)
    up = torch.randn(2, T, generator=torch.Generator().manual_seed(2))
    want, want_dx, _ = _grads_through_an_op(_lpe(targets, False), logits, 0.9, up)
    got, got_dx, buffer = _grads_through_an_op(_lpe(targets, True), logits, 0.9, up)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the forward is untouched by the option
    assert torch.equal(got_dx, want_dx)  # same kernel, same rounding: bit-identical gradient
    assert torch.equal(buffer, got_dx), "inplace_backward=True did not leave dlogits in the logits buffer"


def test_inplace_backward_grpo_loss():
    logits, targets = random_logits(T, V, torch.bfloat16), random_targets(T, V, ignore_every=4)
    fn, _ = _grpo(targets, False)
    up = torch.randn(1, T, generator=torch.Generator().manual_seed(4))
    want, want_dx, _ = _grads_through_an_op(lambda x, t: fn(x, t)[:1], logits, 1.1, up)
    got, got_dx, buffer = _grads_through_an_op(lambda x, t: fn(x, t, inplace_backward=True)[:1], logits, 1.1, up)
    assert torch.equal(got[0], want[0]) and torch.equal(got_dx, want_dx) and torch.equal(buffer, got_dx)


def _backward_allocated_bytes(fn, logits) -> int:
    """Bytes torch's CPU allocator hands out during the loss's backward (profiler memory events)."""
    x = logits.detach().clone().requires_grad_(True) * 1.0  # made by an op, like the output layer's
    lp, ent = fn(x, 1.0)
    loss = lp.sum() + ent.sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(loss, [x])  # dL/dlogits only: no upstream op's own buffers in the count
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.nbytes() > 0)


def test_inplace_backward_allocates_no_second_logits_buffer():
    logits, targets = random_logits(T, 4096, torch.float32), random_targets(T, 4096)
    logits_bytes = logits.numel() * logits.element_size()
    separate = _backward_allocated_bytes(_lpe(targets, False), logits)
    inplace = _backward_allocated_bytes(_lpe(targets, True), logits)
    assert separate >= logits_bytes, (separate, logits_bytes)  # the measurement sees the dlogits buffer
    assert inplace < logits_bytes // 4, (inplace, logits_bytes)  # only [T]-sized vectors remain


def test_inplace_backward_refuses_a_leaf_and_a_second_backward():
    logits, targets = random_logits(8, 300, torch.float32), random_targets(8, 300)
    with pytest.raises(ValueError, match="leaf tensor"):
        fused_logprob_entropy(logits.clone().requires_grad_(True), targets, inplace_backward=True)
    x = logits.clone().requires_grad_(True) * 1.0
    lp, _ = fused_logprob_entropy(x, targets, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        lp.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_rows_are_never_read(dtype):
    """NaN in every ignored row: had the kernels read them, NaN would reach an output or a gradient."""
    clean, targets = random_logits(T, V, dtype, seed=5), _skipping_targets()
    poisoned = clean.clone()
    poisoned[targets == -100] = float("nan")
    up = torch.randn(2, T, generator=torch.Generator().manual_seed(6))
    got, got_dx, _ = _grads_through_an_op(_lpe(targets, True), poisoned, torch.tensor(0.8), up)
    want, want_dx, _ = _grads_through_an_op(lambda x, t: logprob_entropy_reference(x, targets, t), clean, 0.8, up)
    for name, a, b in zip(("logprobs", "entropy"), got, want):
        assert_close(name, a, b, **OUTPUT_TOL)
    assert_close("dlogits", got_dx, want_dx, **GRAD_TOL[dtype])
    assert bool((got_dx[targets == -100] == 0).all())


def test_grpo_rows_without_loss_are_never_read():
    """loss_mask 0 (prompt / padding rows) is skipped like an ignored label: NaN there changes nothing."""
    clean, targets = random_logits(T, V, torch.float32, seed=7), _skipping_targets(seed=8)
    fn, mask = _grpo(targets, False)
    skipped = (mask == 0) | (targets == -100)
    poisoned = clean.clone()
    poisoned[skipped] = float("nan")
    up = torch.randn(3, T, generator=torch.Generator().manual_seed(9))
    got, got_dx, _ = _grads_through_an_op(lambda x, t: fn(x, t)[:1], poisoned, 0.9, up)
    want, want_dx, _ = _grads_through_an_op(lambda x, t: fn(x, t, impl=grpo_loss_reference)[:1], clean, 0.9, up)
    assert_close("loss", got[0], want[0], **OUTPUT_TOL)
    assert_close("dlogits", got_dx, want_dx, **GRAD_TOL[torch.float32])
    stats = fn(poisoned, 0.9)
    assert bool((stats[1][skipped] == 0).all() and (stats[2][skipped] == 0).all())
    assert bool(torch.isfinite(stats[1]).all())
