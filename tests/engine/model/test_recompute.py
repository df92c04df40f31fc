"""Activation recomputation (selective, full, vision blocks) changes memory, not the gradients."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.model.build import build_vlm
from engine.train.losses import token_logprobs
from engine.train.step import model_inputs
from tests.engine.parallel.dist_worker import TINY, make_batches


def _grads(cfg, pg, state):
    model = build_vlm(cfg, pg)
    model.load_state_dict(state)
    batch = make_batches(cfg)[3]  # image rows and a packed row
    logits = model(**model_inputs(batch))
    logprobs, _ = token_logprobs(logits, batch["labels"], None, "reference", vocab_size=cfg.model.llm.vocab_size)
    (-(logprobs * batch["loss_mask"]).sum()).backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [
    ["performance.recompute_granularity=selective", "performance.recompute_modules=[mlp,layernorm,core_attn]",
     "performance.recompute_vision=true"],
    ["performance.recompute_granularity=full"],
], ids=["selective+vision", "full"])
def test_recompute_gives_the_same_gradients(single_process_pg, overrides):
    plain_cfg = load_config(None, TINY)
    torch.manual_seed(0)
    state = build_vlm(plain_cfg, single_process_pg).state_dict()
    _, want = _grads(plain_cfg, single_process_pg, state)
    cfg = load_config(None, TINY + ["train.recompute_activations=true", *overrides])
    model, got = _grads(cfg, single_process_pg, state)
    perf = cfg.performance.resolve(cfg)
    if perf.recompute_granularity:
        assert model.llm.config.recompute_granularity == perf.recompute_granularity
    assert model.vision.recompute == perf.recompute_vision
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
