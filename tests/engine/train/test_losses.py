"""engine/train/losses.py, the one entry point from a model output to per-token log-probs and GRPO loss:
the impls agree (fused on logits, fused_linear on hidden states + weight, the torch reference), padded
vocab columns are excluded, loss-masked rows are skipped, and misuse is a clear error. One process, TP=1."""

from __future__ import annotations

import pytest
import torch

from engine.train.losses import token_grpo_loss, token_logprobs

B, S, H, V_PADDED, VOCAB = 2, 37, 24, 256, 250
GRPO_KW = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.05, kl_type="k3", temperature=0.9)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V_PADDED, H, generator=g) * 0.5
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    return hidden, weight, labels, mask, g


def _output(impl, hidden, weight):
    """What the model hands the loss: hidden states for fused_linear, logits (made by a matmul) otherwise."""
    if impl == "fused_linear":
        return hidden
    return hidden @ weight.t()  # (B, S, V_padded), padding columns included as the output layer makes them


def _grpo(impl, hidden, weight, labels, mask, old, adv, ref):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    per_token, stats = token_grpo_loss(_output(impl, h, w), labels, old, adv, mask, ref, tp_group=None, impl=impl,
                                       vocab_size=VOCAB, weight=w if impl == "fused_linear" else None,
                                       inplace_backward=impl == "fused", **GRPO_KW)
    per_token.sum().backward()
    return per_token.detach(), stats, h.grad, w.grad


def test_grpo_loss_is_the_same_for_every_impl():
    hidden, weight, labels, mask, g = _problem()
    with torch.no_grad():
        lp, _ = token_logprobs(hidden @ weight.t(), labels, None, "fused", 0.9, VOCAB)
    old, ref = lp + 0.4 * torch.randn(B, S, generator=g), lp + 0.3 * torch.randn(B, S, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, S).contiguous()  # one advantage per sequence
    results = {impl: _grpo(impl, hidden, weight, labels, mask, old, adv, ref)
               for impl in ("fused", "fused_linear", "reference")}
    want_loss, want_stats, want_dh, want_dw = results["reference"]
    assert want_loss.shape == (B, S) and bool((want_loss[mask == 0] == 0).all())
    for impl in ("fused", "fused_linear"):
        loss, stats, dh, dw = results[impl]
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl} loss: {m}")
        for key in ("logprobs", "entropy", "ratio", "kl", "clipped_low", "clipped_high", "dual_clipped"):
            assert stats[key].shape == (B, S), key
            torch.testing.assert_close(stats[key].float(), want_stats[key].float(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{impl} {key}: {m}")
        torch.testing.assert_close(dh, want_dh, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl} dhidden: {m}")
        torch.testing.assert_close(dw, want_dw, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl} dweight: {m}")
    assert bool((results["fused_linear"][3][VOCAB:] == 0).all())  # padded vocab rows: no gradient


@pytest.mark.parametrize("impl", ["fused", "fused_linear"])
def test_loss_mask_skips_rows_and_keeps_the_others(impl):
    hidden, weight, labels, mask, _ = _problem(seed=1)
    kw = dict(weight=weight if impl == "fused_linear" else None)
    with torch.no_grad():
        full, full_ent = token_logprobs(_output(impl, hidden, weight), labels, None, impl, 1.0, VOCAB, **kw)
        skipped, skipped_ent = token_logprobs(_output(impl, hidden, weight), labels, None, impl, 1.0, VOCAB,
                                              loss_mask=mask, **kw)
    keep = mask != 0
    torch.testing.assert_close(skipped[keep], full[keep], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(skipped_ent[keep], full_ent[keep], atol=1e-6, rtol=1e-6)
    assert bool((skipped[~keep] == 0).all() and (skipped_ent[~keep] == 0).all())
    assert bool((full[~keep] < 0).all())  # without the mask those rows are computed


def test_misuse_is_a_clear_error():
    hidden, weight, labels, _, _ = _problem()
    with pytest.raises(ValueError, match="needs the output layer's weight"):
        token_logprobs(hidden, labels, None, "fused_linear", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="only used by loss_impl=fused_linear"):
        token_logprobs(hidden @ weight.t(), labels, None, "fused", vocab_size=VOCAB, weight=weight)
    with pytest.raises(ValueError, match="was the model prepared"):
        token_logprobs(hidden @ weight.t(), labels, None, "fused_linear", vocab_size=VOCAB, weight=weight)
    with pytest.raises(ValueError, match="loss impl must be one of"):
        token_logprobs(hidden @ weight.t(), labels, None, "fast", vocab_size=VOCAB)
