"""Compiled kernels at real sizes (Qwen2.5 vocab, bf16) vs the oracle; skipped without CUDA."""

import pytest
import torch

from kernels import (
    fused_grpo_loss,
    fused_linear_logprob_entropy,
    fused_logprob_entropy,
    grpo_loss_reference,
    linear_logprob_entropy_reference,
    logprob_entropy_reference,
)
from kernels_testlib import (
    GRAD_TOL,
    OUTPUT_TOL,
    TEMPERATURE_GRAD_TOL,
    assert_close,
    assert_matmul_grad_close,
    linear_grads,
)

pytestmark = pytest.mark.gpu
# The temperature gradient sums T*V = 6e8 fp32 terms in a different order on each side (per-row
# partials vs autograd's reduction): allow 1e-3 relative there, instead of 1e-4 at CPU test sizes.
BIG_SUM_TOL = dict(TEMPERATURE_GRAD_TOL, rtol=1e-3)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(T, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(T, V, generator=g, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g, device="cuda")
    targets[::97] = -100
    return logits, targets, torch.randn(2, T, generator=g, device="cuda")


def _run(fn, logits, up):
    x = logits.clone().requires_grad_(True)
    temp = torch.tensor(0.9, device="cuda", requires_grad=True)
    outs = fn(x, temp)
    sum((o * g).sum() for o, g in zip(outs, up)).backward()
    return [o.detach() for o in outs], x.grad, temp.grad


@requires_cuda
@pytest.mark.parametrize(("T", "V"), [(4096, 152064), (4096, 151936), (4096, 152064 // 8), (1, 152064)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logprob_entropy_real_size(T, V, dtype):
    logits, targets, up = _inputs(T, V, dtype)
    got, got_dx, got_dt = _run(lambda x, t: fused_logprob_entropy(x, targets, t), logits, up)
    want, want_dx, want_dt = _run(lambda x, t: logprob_entropy_reference(x, targets, t), logits, up)
    for name, a, b in zip(("logprobs", "entropy"), got, want):
        assert_close(name, a, b, **OUTPUT_TOL)
    assert bool((got[0] <= 0).all())
    assert_close("dlogits", got_dx, want_dx, **GRAD_TOL[dtype])
    assert_close("dtemperature", got_dt, want_dt, **BIG_SUM_TOL)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_grpo_loss_real_size(dtype):
    T, V = 4096, 152064
    logits, targets, up = _inputs(T, V, dtype, seed=1)
    with torch.no_grad():
        lp, _ = logprob_entropy_reference(logits, targets, 0.9)
    g = torch.Generator(device="cuda").manual_seed(2)
    old = lp + 0.3 * torch.randn(T, generator=g, device="cuda")
    ref = lp + 0.3 * torch.randn(T, generator=g, device="cuda")
    adv = torch.randn(T, generator=g, device="cuda")
    mask = torch.ones(T, device="cuda")
    kw = dict(dual_clip_c=3.0, kl_coef=0.05, kl_type="k3")

    def fused(x, t):
        return (fused_grpo_loss(x, targets, old, adv, mask, ref, temperature=t, **kw)[0],)

    def reference(x, t):
        return (grpo_loss_reference(x, targets, old, adv, mask, ref, temperature=t, **kw)[0],)

    got, got_dx, got_dt = _run(fused, logits, up[:1])
    want, want_dx, want_dt = _run(reference, logits, up[:1])
    assert_close("loss", got[0], want[0], **OUTPUT_TOL)
    assert_close("dlogits", got_dx, want_dx, **GRAD_TOL[dtype])
    assert_close("dtemperature", got_dt, want_dt, **BIG_SUM_TOL)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_linear_real_size(dtype):
    """Output layer of Qwen2.5-32B (H=5120, V=152064 padded from 151643) at T=4096, with cuBLAS chunk GEMMs.

    Unlike on CPU, cuBLAS may pick another algorithm for a [C, H] chunk than for the whole [T, H], so a
    bf16 logit can round differently: outputs get 2 bf16 ulps of the largest |logit| (fp32: 1e-4)."""
    T, H, V, vocab = 4096, 5120, 152064, 151643
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(T, H, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(V, H, generator=g, device="cuda") * (4.0 / H**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (T,), generator=g, device="cuda")
    targets[::97] = -100
    up = {"logprobs": torch.randn(T, generator=g, device="cuda"), "entropy": torch.randn(T, generator=g, device="cuda")}

    def fused(h, w, t):
        lp, ent = fused_linear_logprob_entropy(h, w, targets, t, vocab_size=vocab)
        return {"logprobs": lp, "entropy": ent}

    def reference(h, w, t):
        lp, ent = linear_logprob_entropy_reference(h, w, targets, t, vocab_size=vocab)
        return {"logprobs": lp, "entropy": ent}

    got, got_dh, got_dw, got_dt = linear_grads(fused, hidden, weight, torch.tensor(0.9, device="cuda"), up)
    want, want_dh, want_dw, want_dt = linear_grads(reference, hidden, weight, torch.tensor(0.9, device="cuda"), up)
    z = (hidden @ weight.t()).float()[:, :vocab].detach().requires_grad_(True)  # for the tolerances
    atol = 2.0**-7 * z.detach().abs().max().item() if dtype == torch.bfloat16 else 1e-4
    lp, ent = logprob_entropy_reference(z, targets, 0.9)
    dz, = torch.autograd.grad((lp * up["logprobs"]).sum() + (ent * up["entropy"]).sum(), [z])
    for key in ("logprobs", "entropy"):
        assert_close(key, got[key], want[key], atol=atol, rtol=1e-5)
    dz = torch.nn.functional.pad(dz.abs(), (0, V - vocab))  # [T, V]; padding columns carry no gradient
    assert_matmul_grad_close("dhidden", got_dh, want_dh, dz @ weight.float().abs(), dtype)
    assert_matmul_grad_close("dweight", got_dw, want_dw, dz.t() @ hidden.float().abs(), dtype)
    assert_close("dtemperature", got_dt, want_dt, **BIG_SUM_TOL)
