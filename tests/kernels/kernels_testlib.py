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
