"""fused_logprob_entropy vs the torch oracle (Triton interpreter on CPU; compiled on a GPU)."""

import math

import pytest
import torch

from kernels import fused_logprob_entropy, logprob_entropy_reference
from kernels.logprob_entropy import MAX_BLOCK_V
from kernels_testlib import compare_impl_to_reference, random_logits, random_targets

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ODD_V = MAX_BLOCK_V * 3 + 37  # not a multiple of the vocab block: exercises the masked tail


def _fused(targets):
    def fn(x, temp):
        lp, ent = fused_logprob_entropy(x, targets, temp)
        return {"logprobs": lp, "entropy": ent}
    return fn


def _reference(targets):
    def fn(x, temp):
        lp, ent = logprob_entropy_reference(x, targets, temp)
        return {"logprobs": lp, "entropy": ent}
    return fn


def _check(logits, targets, temperature, upstream_keys=("logprobs", "entropy"), seed=2):
    g = torch.Generator().manual_seed(seed)
    upstream = {k: torch.randn(logits.shape[0], generator=g) for k in upstream_keys}
    got = compare_impl_to_reference(_fused(targets), _reference(targets), logits, temperature,
                                    upstream, ("logprobs", "entropy"))
    assert got["logprobs"].dtype == torch.float32 and got["entropy"].dtype == torch.float32
    assert bool((got["logprobs"] <= 0).all()), f"positive log-prob: {got['logprobs'].max().item()}"
    assert bool((got["entropy"] >= 0).all()), f"negative entropy: {got['entropy'].min().item()}"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_vocab_with_ignored_rows_and_temperature_grad(dtype):
    T, V = 37, _ODD_V
    targets = random_targets(T, V, ignore_every=5)
    got = _check(random_logits(T, V, dtype), targets, torch.tensor(0.7))
    ignored = targets == -100
    assert bool((got["logprobs"][ignored] == 0).all() and (got["entropy"][ignored] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token(dtype):
    _check(random_logits(1, 300, dtype, seed=3), random_targets(1, 300, seed=4), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(dtype):
    """+-1e4 logits (fp16 max is 65504): the row max dominates; nothing may overflow or go nan."""
    T, V = 16, 513
    logits = random_logits(T, V, torch.float32, seed=5)
    logits[:, ::7] = 1e4
    logits[:, 3::11] = -1e4
    logits[0] = -1e4  # a row where every logit is the same huge negative value: uniform p
    targets = random_targets(T, V, seed=6)
    targets[1] = 0  # a target at +1e4 (near-certain token: logprob must be <= 0, about -log 74)
    targets[2] = 3  # a target at -1e4: logprob ~ -2e4 / temperature
    got = _check(logits.to(dtype), targets, torch.tensor(1.5))
    assert got["entropy"][0].item() == pytest.approx(math.log(V), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_ignored_gives_zeros_and_zero_grad(dtype):
    T, V = 9, 300
    targets = torch.full((T,), -100)
    logits = random_logits(T, V, dtype).requires_grad_(True)
    lp, ent = fused_logprob_entropy(logits, targets, 2.0)
    (lp.sum() + ent.sum()).backward()
    assert bool((lp == 0).all() and (ent == 0).all())
    assert logits.grad.dtype == dtype and bool((logits.grad == 0).all())


@pytest.mark.parametrize("upstream", [("logprobs",), ("entropy",)])
def test_only_one_output_used(upstream):
    """The backward must handle a missing output gradient (None) for either output."""
    _check(random_logits(20, 700, torch.float32), random_targets(20, 700), torch.tensor(1.2),
           upstream_keys=upstream)


def test_near_certain_token_logprob_not_positive():
    """verl #2656: fused log-probs came out positive. Dominant target logit -> logprob in (-eps, 0]."""
    V = 1000
    logits = torch.full((4, V), -30.0)
    targets = torch.tensor([0, 1, 2, 3])
    logits[torch.arange(4), targets] = torch.tensor([30.0, 50.0, 80.0, 100.0])
    lp, _ = fused_logprob_entropy(logits, targets)
    want, _ = logprob_entropy_reference(logits, targets)
    assert bool((lp <= 0).all()), lp
    torch.testing.assert_close(lp, want, atol=1e-7, rtol=0)


def test_padded_vocab_minus_inf_columns():
    """Vocab padding set to -inf (a common trick) must not produce nan in outputs or grads."""
    logits = random_logits(12, 400, torch.float32)
    logits[:, 350:] = float("-inf")
    _check(logits, random_targets(12, 350), torch.tensor(0.9))


def test_non_contiguous_rows():
    """A [T, V] view into a wider buffer (row stride != V) is read correctly, without a copy."""
    wide = random_logits(10, 520, torch.bfloat16)
    logits = wide[:, :500]
    assert logits.stride(0) == 520
    _check(logits, random_targets(10, 500), 1.0)


def test_float_temperature_gives_no_temperature_grad():
    logits = random_logits(6, 300, torch.float32).requires_grad_(True)
    lp, ent = fused_logprob_entropy(logits, random_targets(6, 300), 0.5)
    (lp + ent).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("logits_shape", "targets", "temperature", "message"),
    [
        ((4, 10), torch.tensor([0, 1, 10, 2]), 1.0, r"targets\[2\] = 10 is outside"),
        ((4, 10), torch.tensor([0, 1, -5, 2]), 1.0, r"targets\[2\] = -5 is outside"),
        ((4, 10), torch.tensor([0, 1, 2]), 1.0, r"targets must be \[T\]=4"),
        ((4, 10), torch.tensor([0, 1, 2, 3], dtype=torch.int32), 1.0, "int64"),
        ((2, 4, 10), torch.tensor([0, 1]), 1.0, r"must be \[T, V\]"),
        ((4, 10), torch.tensor([0, 1, 2, 3]), 0.0, "temperature must be > 0"),
    ],
)
def test_bad_input_raises_clear_error(logits_shape, targets, temperature, message):
    with pytest.raises(ValueError, match=message):
        fused_logprob_entropy(torch.randn(*logits_shape), targets, temperature)


# ---- the checks themselves must be able to fail ----------------------------------------------
def test_checks_catch_dropped_temperature_gradient():
    """A variant that forgets d/d temperature (but keeps correct outputs) must fail the comparison."""
    targets = random_targets(8, 300)

    def broken(x, temp):
        lp, ent = fused_logprob_entropy(x, targets, temp.detach())
        return {"logprobs": lp + 0 * temp, "entropy": ent + 0 * temp}  # temperature grad is 0

    upstream = {"logprobs": torch.ones(8), "entropy": torch.ones(8)}
    with pytest.raises(AssertionError, match="dtemperature"):
        compare_impl_to_reference(broken, _reference(targets), random_logits(8, 300, torch.float32),
                                  torch.tensor(0.8), upstream, ("logprobs", "entropy"))


def test_checks_catch_an_extra_bf16_rounding():
    """Dividing by the temperature in bf16 before the kernel (one extra rounding) must be caught:
    the bf16 tolerances are tight enough to see a single lost rounding step."""
    targets = random_targets(8, 300)

    def broken(x, temp):
        lp, ent = fused_logprob_entropy((x / temp).to(torch.bfloat16), targets, 1.0)
        return {"logprobs": lp, "entropy": ent}

    upstream = {"logprobs": torch.ones(8), "entropy": torch.ones(8)}
    with pytest.raises(AssertionError, match="logprobs|entropy"):
        compare_impl_to_reference(broken, _reference(targets), random_logits(8, 300, torch.bfloat16),
                                  torch.tensor(0.7), upstream, ("logprobs", "entropy"))


def test_many_programs():
    """T larger than one program's row tile: several programs, the last one partly masked."""
    from kernels.logprob_entropy import ROWS_PER_PROGRAM
    T = 2 * ROWS_PER_PROGRAM + 3
    _check(random_logits(T, 700, torch.bfloat16, seed=9), random_targets(T, 700, ignore_every=4), 1.1)
