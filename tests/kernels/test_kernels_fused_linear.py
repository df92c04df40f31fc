"""fused_linear_logprob_entropy / fused_linear_grpo_loss vs the materialised-logits path (the oracle:
hidden @ weight^T in the dtype, then the torch reference): outputs and the gradients w.r.t. hidden,
weight and temperature, on odd T / H / V, padded vocab, ignored rows, several chunks, fp32 and bf16."""

import pytest
import torch

from kernels import (
    fused_grpo_loss,
    fused_linear_grpo_loss,
    fused_linear_logprob_entropy,
    grpo_loss_reference,
    linear_grpo_loss_reference,
    linear_logprob_entropy_reference,
    logprob_entropy_reference,
)
from kernels.fused_linear_logprob_entropy import MIN_CHUNK_ROWS, default_chunk_rows
from kernels_testlib import (
    OUTPUT_TOL,
    assert_close,
    compare_linear_to_reference,
    random_linear_problem,
)

DTYPES = [torch.float32, torch.bfloat16]
T, H, V_PADDED, VOCAB = 203, 67, 1152, 1037  # odd T / H / vocab; 115 padded weight rows past the vocab


def _lpe_fns(targets, vocab_size, chunk_size):
    def fused(h, w, temp):
        lp, ent = fused_linear_logprob_entropy(h, w, targets, temp, vocab_size=vocab_size, chunk_size=chunk_size)
        return {"logprobs": lp, "entropy": ent}

    def reference(h, w, temp):
        lp, ent = linear_logprob_entropy_reference(h, w, targets, temp, vocab_size=vocab_size)
        return {"logprobs": lp, "entropy": ent}

    def on_logits(logits, temp):  # full [T, V_padded] logits -> the same outputs (for the error bound)
        lp, ent = logprob_entropy_reference(logits[:, :vocab_size], targets, temp)
        return {"logprobs": lp, "entropy": ent}
    return fused, reference, on_logits


def _upstream(keys, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(T, generator=g) for k in keys}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_ROWS, None], ids=["4-chunks", "default-chunks"])
def test_logprob_entropy_matches_materialised_logits(dtype, chunk_size):
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, dtype, ignore_every=7, vocab_size=VOCAB)
    fused, reference, on_logits = _lpe_fns(targets, VOCAB, chunk_size)
    got = compare_linear_to_reference(fused, reference, on_logits, hidden, weight, torch.tensor(0.7),
                                      _upstream(("logprobs", "entropy")), ("logprobs", "entropy"))
    ignored = targets == -100
    assert bool((got["logprobs"][ignored] == 0).all() and (got["entropy"][ignored] == 0).all())
    assert bool((got["logprobs"] <= 0).all() and (got["entropy"] >= 0).all())


@pytest.mark.parametrize("upstream", [("logprobs",), ("entropy",)])
def test_only_one_output_used(upstream):
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, torch.float32, vocab_size=VOCAB, seed=4)
    fused, reference, on_logits = _lpe_fns(targets, VOCAB, 100)
    compare_linear_to_reference(fused, reference, on_logits, hidden, weight, 1.3, _upstream(upstream),
                                ("logprobs", "entropy"))


def test_padding_rows_of_the_weight_get_zero_gradient_and_are_ignored():
    """Padding rows of the weight (past vocab_size) never enter the softmax: huge values there change
    nothing, and their gradient is exactly 0."""
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, torch.float32, vocab_size=VOCAB, seed=5)
    poisoned = weight.clone()
    poisoned[VOCAB:] = 1e4
    w = poisoned.requires_grad_(True)
    lp, ent = fused_linear_logprob_entropy(hidden, w, targets, vocab_size=VOCAB, chunk_size=64)
    want_lp, want_ent = linear_logprob_entropy_reference(hidden, weight, targets, vocab_size=VOCAB)
    assert_close("logprobs", lp, want_lp, **OUTPUT_TOL)
    assert_close("entropy", ent, want_ent, **OUTPUT_TOL)
    (lp.sum() + ent.sum()).backward()
    assert bool((w.grad[VOCAB:] == 0).all()) and bool(w.grad[:VOCAB].abs().sum() > 0)


def test_no_labelled_rows_gives_zeros_and_zero_grads():
    hidden, weight, _ = random_linear_problem(9, H, 300, torch.bfloat16)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    lp, ent = fused_linear_logprob_entropy(h, w, torch.full((9,), -100))
    (lp.sum() + ent.sum()).backward()
    assert bool((lp == 0).all() and (ent == 0).all())
    assert bool((h.grad == 0).all() and (w.grad == 0).all()) and h.grad.dtype == torch.bfloat16


def test_default_chunk_rule():
    """Liger's rule: a [C, V] chunk about as large as [T, H] (so independent of V), within the clamps."""
    assert default_chunk_rows(4096, 32000, 1024) == max(MIN_CHUNK_ROWS, 128)  # 4096 / ceil(32000 / 1024)
    assert default_chunk_rows(16384, 152064, 5120) == 1024  # 16384 / 30 -> 547 -> 1024
    assert default_chunk_rows(3, 152064, 5120) == MIN_CHUNK_ROWS


# ---- GRPO ----------------------------------------------------------------------------------------
GRPO_KW = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.05, kl_type="k3")


def _grpo_inputs(hidden, weight, targets, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp, _ = linear_logprob_entropy_reference(hidden, weight, targets, 0.8, vocab_size=VOCAB)
    old = lp + 0.5 * torch.randn(T, generator=g)  # ratios spread over every clip branch
    ref = lp + 0.3 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) > 0.3).float()
    return old, adv, mask, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_loss_matches_materialised_logits(dtype):
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, dtype, ignore_every=11, vocab_size=VOCAB, seed=6)
    old, adv, mask, ref = _grpo_inputs(hidden, weight, targets)

    def fused(h, w, temp):
        loss, st = fused_linear_grpo_loss(h, w, targets, old, adv, mask, ref, temperature=temp, vocab_size=VOCAB,
                                          chunk_size=64, **GRPO_KW)
        return {"loss": loss, **st}

    def reference(h, w, temp):
        loss, st = linear_grpo_loss_reference(h, w, targets, old, adv, mask, ref, temperature=temp, vocab_size=VOCAB,
                                              **GRPO_KW)
        return {"loss": loss, **st}

    def on_logits(logits, temp):
        return {"loss": grpo_loss_reference(logits[:, :VOCAB], targets, old, adv, mask, ref, temperature=temp,
                                            **GRPO_KW)[0]}

    got = compare_linear_to_reference(fused, reference, on_logits, hidden, weight, torch.tensor(0.8),
                                      _upstream(("loss",)), ("loss", "logprobs", "entropy", "ratio", "kl"))
    want = reference(hidden, weight, 0.8)
    for flag in ("clipped_low", "clipped_high", "dual_clipped"):
        assert got[flag].dtype == torch.bool and torch.equal(got[flag], want[flag]), flag
    assert got["clipped_low"].any() and got["clipped_high"].any() and got["dual_clipped"].any()
    skipped = (mask == 0) | (targets == -100)
    for key in ("loss", "logprobs", "entropy", "ratio", "kl"):
        assert bool((got[key][skipped] == 0).all()), key


def test_grpo_equals_fused_grpo_on_materialised_logits():
    """The same numbers as today's logits-input kernel (what GRPO runs with loss_impl=fused)."""
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, torch.float32, vocab_size=VOCAB, seed=8)
    old, adv, mask, ref = _grpo_inputs(hidden, weight, targets, seed=9)
    got, got_st = fused_linear_grpo_loss(hidden, weight, targets, old, adv, mask, ref, temperature=0.8,
                                         vocab_size=VOCAB, **GRPO_KW)
    logits = (hidden @ weight.t())[:, :VOCAB].contiguous()
    want, want_st = fused_grpo_loss(logits, targets, old, adv, mask, ref, temperature=0.8, **GRPO_KW)
    assert_close("loss", got, want, **OUTPUT_TOL)
    for key in ("logprobs", "entropy", "ratio", "kl"):
        assert_close(key, got_st[key], want_st[key], **OUTPUT_TOL)


# ---- errors and the checks' power ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("dtype", "must share one dtype"),
        ("hidden_size", "disagree on H"),
        ("target", r"targets\[3\] = 1037 is outside the vocabulary \[0, 1037\)"),
        ("vocab_size", r"vocab_size=2000 must be in"),
        ("chunk", "chunk_size must be >= 1"),
    ],
)
def test_bad_input_raises_clear_error(case, message):
    hidden, weight, targets = random_linear_problem(8, H, V_PADDED, torch.float32, vocab_size=VOCAB)
    kw = dict(vocab_size=VOCAB)
    if case == "dtype":
        weight = weight.to(torch.bfloat16)
    elif case == "hidden_size":
        hidden = hidden[:, :-1]
    elif case == "target":
        targets[3] = VOCAB  # a padding id: not a real token
    elif case == "vocab_size":
        kw["vocab_size"] = 2000
    elif case == "chunk":
        kw["chunk_size"] = 0
    with pytest.raises(ValueError, match=message):
        fused_linear_logprob_entropy(hidden, weight, targets, **kw)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 0.999), (torch.bfloat16, 0.9)])
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_fused_linear_checks_catch_a_scaled_gradient(dtype, scale, which):
    """A gradient off by 0.1% (fp32) / 10% (bf16) with exact forward values must fail the GEMM bound."""
    hidden, weight, targets = random_linear_problem(T, H, V_PADDED, dtype, vocab_size=VOCAB, seed=10)
    fused, reference, on_logits = _lpe_fns(targets, VOCAB, 64)

    def broken(h, w, temp):
        x = h if which == "hidden" else w
        scaled = x.detach() + (x - x.detach()) * scale  # same values, gradient times `scale`
        return fused(scaled, w, temp) if which == "hidden" else fused(h, scaled, temp)

    with pytest.raises(AssertionError, match=f"d{which}"):
        compare_linear_to_reference(broken, reference, on_logits, hidden, weight, 1.0,
                                    _upstream(("logprobs", "entropy")), ("logprobs", "entropy"))
