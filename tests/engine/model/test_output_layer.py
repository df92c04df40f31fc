"""The output layer in hidden-states mode (train.loss_impl=fused_linear) on one process: the model returns
(b, s, h), checkpoints keep their keys, and the fused-linear loss gives the logits path's loss and the same
gradient on every parameter, with tied and untied embeddings."""

from __future__ import annotations

import pytest
import torch

from engine.model.build import build_vlm
from engine.model.output_layer import emits_hidden_states, logits_output, output_weight
from engine.train.losses import prepare_model
from engine.train.step import masked_nll_loss, model_inputs
from tests.engine.model.test_vlm import tiny_cfg
from tests.engine.parallel.dist_worker import make_batches


def _loss_and_grads(model, batch, impl, vocab):
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    loss, count, _ = masked_nll_loss(batch, None, impl, vocab, out,
                                     weight=output_weight(model) if impl == "fused_linear" else None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_linear_equals_logits_path_on_every_parameter(single_process_pg, tied):
    cfg = tiny_cfg(f"model.llm.tie_embeddings={str(tied).lower()}")
    torch.manual_seed(0)
    model = build_vlm(cfg, single_process_pg)
    vocab = cfg.model.llm.vocab_size
    batch = make_batches(cfg)[-1]  # image rows, a text-only row, a packed row
    keys_before = set(model.state_dict())
    want_loss, want_grads = _loss_and_grads(model, batch, "fused", vocab)

    prepare_model(model, "fused_linear")
    assert emits_hidden_states(model)
    hidden = model(**model_inputs(batch))
    assert hidden.shape == (*batch["tokens"].shape, cfg.model.llm.hidden_size)
    assert set(model.state_dict()) == keys_before  # checkpoints are interchangeable between impls
    weight = output_weight(model)
    if tied:
        assert weight is model.llm.embedding.word_embeddings.weight
    else:
        assert weight is model.llm.output_layer.weight
    with logits_output(model):
        logits = model(**model_inputs(batch))
    assert logits.shape[-1] == cfg.model.llm.padded_vocab_size(1) and emits_hidden_states(model)

    got_loss, got_grads = _loss_and_grads(model, batch, "fused_linear", vocab)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 60
    for name, grad in want_grads.items():  # fp32: the same math in another summation order
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_linear_without_the_weight_or_without_prepare_is_a_clear_error(single_process_pg):
    cfg = tiny_cfg()
    model = build_vlm(cfg, single_process_pg)
    batch = make_batches(cfg)[0]
    logits = model(**model_inputs(batch))
    with pytest.raises(ValueError, match="was the model prepared"):
        masked_nll_loss(batch, None, "fused_linear", cfg.model.llm.vocab_size, logits, weight=output_weight(model))
    prepare_model(model, "fused_linear")
    hidden = model(**model_inputs(batch))
    with pytest.raises(ValueError, match="needs the output layer's weight"):
        masked_nll_loss(batch, None, "fused_linear", cfg.model.llm.vocab_size, hidden)
    with pytest.raises(ValueError, match="only used by loss_impl=fused_linear"):
        masked_nll_loss(batch, None, "fused", cfg.model.llm.vocab_size, hidden, weight=output_weight(model))
