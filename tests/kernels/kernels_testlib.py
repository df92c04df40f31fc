"""Shared checks for the kernel tests: run an implementation and the torch oracle, compare everything.

Tolerances (per dtype of the logits):
- Outputs (logprobs, entropy, loss, ratio, kl) are fp32 in both the kernel and the reference, computed
  from the same values (bf16/fp16 logits are upcast exactly), so every dtype gets the fp32 tolerance:
  1e-5 absolute + 1e-5 relative (summation order is the only difference).
- dlogits are computed in fp32 and rounded once to the logits' dtype by both sides. Two fp32 values
  1e-6 apart can straddle a rounding boundary, so the check allows one unit in the last place of
  the target dtype: rtol 2^-7 for bf16 (8-bit significand: an ulp is 2^-8..2^-7 of the value),
  2^-10 for fp16 (11 bits), plus 1e-6 absolute for values near zero. fp32: 1e-5 / 1e-5.
- The temperature gradient is an fp32 sum over T*V terms on both sides: rtol 1e-4 for the order.
`test_checks_catch_*` prove these tolerances are tight enough to catch real bugs.
"""

from __future__ import annotations

import torch

OUTPUT_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-6, rtol=2.0**-7),
    torch.float16: dict(atol=1e-6, rtol=2.0**-10),
}
TEMPERATURE_GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """torch.testing.assert_close with the tensor's name in the message (and dtype-agnostic)."""
    assert got is not None, f"{name}: implementation produced no tensor/gradient"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def run_with_grads(fn, logits, temperature, upstream: dict[str, torch.Tensor]):
    """Call fn(leaf_logits, leaf_temperature) -> dict of outputs; backprop sum(out * upstream)."""
    x = logits.detach().clone().requires_grad_(True)
    temp = temperature.detach().clone().requires_grad_(True) if torch.is_tensor(temperature) else temperature
    outs = fn(x, temp)
    loss = sum((outs[k].float() * g).sum() for k, g in upstream.items())
    loss.backward()
    return outs, x.grad, (temp.grad if torch.is_tensor(temp) else None)


def compare_impl_to_reference(impl, reference, logits, temperature, upstream, output_keys):
    """Assert impl matches reference on the outputs in `output_keys`, dlogits and d temperature."""
    got, got_dx, got_dt = run_with_grads(impl, logits, temperature, upstream)
    want, want_dx, want_dt = run_with_grads(reference, logits, temperature, upstream)
    for key in output_keys:
        assert_close(key, got[key], want[key], **OUTPUT_TOL)
    assert got_dx is not None and got_dx.dtype == logits.dtype, (
        f"dlogits must exist in the logits' dtype {logits.dtype}, got "
        f"{None if got_dx is None else got_dx.dtype}")
    assert_close("dlogits", got_dx, want_dx, **GRAD_TOL[logits.dtype])
    if want_dt is not None:
        assert_close("dtemperature", got_dt if got_dt is not None else torch.zeros_like(want_dt),
                     want_dt, **TEMPERATURE_GRAD_TOL)
    return got


def random_logits(T: int, V: int, dtype, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, V, generator=g) * scale).to(dtype)


def random_targets(T: int, V: int, ignore_every: int = 0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return targets


# ---- fused output layer (hidden @ weight^T inside the loss) ------------------------------------
MATMUL_GRAD_EPS = {torch.float32: 2.0**-17, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""dhidden / dweight come out of a GEMM over dlogits. Both sides round each dlogit once to the dtype
(a boundary straddle: one ulp, relative eps/2), then the GEMM sums V (or T) products and rounds once.
So |got - want| <= eps * (|dlogits| @ |other operand| + |want|) elementwise: the standard GEMM error
bound with the two sides' roundings added. eps = 2^-7 bf16 / 2^-10 fp16 (one ulp, both sides);
fp32: 2^-17 ~ 7.6e-6 for the summation order over up to ~1e4 terms. Plus 1e-6 absolute.
`test_fused_linear_checks_catch_*` show a 10% (bf16) / 0.1% (fp32) error in a gradient fails."""


def assert_matmul_grad_close(name: str, got: torch.Tensor, want: torch.Tensor, abs_terms: torch.Tensor,
                             dtype: torch.dtype) -> None:
    """got/want: a GEMM's gradient; abs_terms: |dlogits| @ |other operand| (fp32/64), same shape."""
    assert got is not None, f"{name}: implementation produced no gradient"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    eps = MATMUL_GRAD_EPS[dtype]
    diff = (got.double() - want.double()).abs()
    bound = eps * (abs_terms.double() + want.double().abs()) + 1e-6
    bad = diff > bound
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0, 0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements outside the GEMM bound; first at "
                             f"flat index {i}: got {got.flatten()[i].item():.6g}, want {want.flatten()[i].item():.6g}, "
                             f"bound {bound.flatten()[i].item():.3g} (max diff {diff.max().item():.3g})")


def random_linear_problem(T: int, H: int, V: int, dtype, ignore_every: int = 0, vocab_size: int | None = None,
                          seed: int = 0):
    """hidden [T, H], weight [V, H] (logits ~ N(0, 3^2)) and targets below vocab_size (or V)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(dtype)
    targets = torch.randint(0, vocab_size or V, (T,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def linear_grads(fn, hidden, weight, temperature, upstream: dict[str, torch.Tensor]):
    """Call fn(h, w, temp) -> dict; backprop sum(out * upstream); returns (outs, dh, dw, dtemp)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    temp = temperature.detach().clone().requires_grad_(True) if torch.is_tensor(temperature) else temperature
    outs = fn(h, w, temp)
    sum((outs[k].float() * g).sum() for k, g in upstream.items()).backward()
    return outs, h.grad, w.grad, (temp.grad if torch.is_tensor(temp) else None)


def reference_dlogits(logits_fn, hidden, weight, temperature, upstream) -> torch.Tensor:
    """fp32 dL/dlogits of the materialised reference (for the GEMM error bound): logits_fn(logits, temp) -> dict."""
    from kernels.reference import output_layer_logits_reference

    logits = output_layer_logits_reference(hidden.float(), weight.float()).requires_grad_(True)
    temp = temperature.detach() if torch.is_tensor(temperature) else temperature
    outs = logits_fn(logits, temp)
    sum((outs[k].float() * g).sum() for k, g in upstream.items()).backward()
    return logits.grad


def compare_linear_to_reference(impl, reference, logits_fn, hidden, weight, temperature, upstream, output_keys):
    """impl / reference: fn(h, w, temp) -> dict. Checks outputs, dhidden, dweight (GEMM bound), dtemperature."""
    got, got_dh, got_dw, got_dt = linear_grads(impl, hidden, weight, temperature, upstream)
    want, want_dh, want_dw, want_dt = linear_grads(reference, hidden, weight, temperature, upstream)
    for key in output_keys:
        assert_close(key, got[key], want[key], **OUTPUT_TOL)
    dz = reference_dlogits(logits_fn, hidden, weight, temperature, upstream).abs().double()  # [T, V]
    assert_matmul_grad_close("dhidden", got_dh, want_dh, dz @ weight.double().abs(), hidden.dtype)
    assert_matmul_grad_close("dweight", got_dw, want_dw, dz.t() @ hidden.double().abs(), hidden.dtype)
    if want_dt is not None:
        assert_close("dtemperature", got_dt if got_dt is not None else torch.zeros_like(want_dt), want_dt,
                     **TEMPERATURE_GRAD_TOL)
    return got
