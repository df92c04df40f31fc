"""Logit processing against hand computations and transformers' processors; config / params validation."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import load_config
from engine.config.base import ConfigError, from_dict
from engine.config.rollout import RolloutConfig
from engine.rollout.base import SamplingParams
from engine.rollout.sampling import apply_logit_bias, apply_repetition_penalty, processed_logits, sample, top_k_top_p_filter


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    # seen & positive -> divided, seen & negative -> multiplied, unseen unchanged
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    ours = apply_repetition_penalty(logits, seen, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_logit_bias_adds_and_bans():
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, {1: 2.5, 3: -math.inf})
    assert out[:, 1].tolist() == [2.5, 2.5] and torch.isneginf(out[:, 3]).all() and out[:, 0].tolist() == [0, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_logit_bias(logits, {7: 1.0})


def test_top_k_top_p_hand_computed():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = ~torch.isneginf(top_k_top_p_filter(logits, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False, False]]
    # top_p=0.8: mass before each token 0, .5, .7, .85 -> keep the first three (0.85 >= 0.8 is dropped)
    kept = ~torch.isneginf(top_k_top_p_filter(logits, -1, 0.8))
    assert kept.tolist() == [[True, True, True, False, False]]
    # order does not matter: a permuted row keeps the same tokens
    perm = torch.tensor([3, 0, 4, 2, 1])
    kept_perm = ~torch.isneginf(top_k_top_p_filter(logits[:, perm], -1, 0.8))
    assert kept_perm[0].tolist() == kept[0, perm].tolist()


def test_top_k_one_is_greedy_and_sampling_respects_ban():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 40, generator=g)
    seen = torch.zeros(16, 40, dtype=torch.bool)
    greedy = logits.argmax(-1)
    drawn = sample(logits, seen, SamplingParams(temperature=1.0, top_k=1), g)
    assert torch.equal(drawn, greedy)
    ban = {int(t): -math.inf for t in greedy.unique()}
    for params in (SamplingParams(temperature=0, logit_bias=ban), SamplingParams(temperature=1.0, logit_bias=ban)):
        drawn = sample(logits, seen, params, g)
        assert not any(int(t) in ban for t in drawn)


def test_temperature_scales_processed_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    out = processed_logits(logits, torch.zeros(1, 3, dtype=torch.bool), SamplingParams(temperature=0.5))
    assert out.tolist() == [[2.0, 4.0, 8.0]]


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(n=0), "n="),
    (dict(logit_bias={3: math.inf}), "logit_bias"),
])
def test_sampling_params_refuse_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def _rollout(data: dict, tp: int = 1, extra: list[str] = ()) -> RolloutConfig:
    cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}", "model.llm.num_attention_heads=16",
                             "model.llm.num_query_groups=2", "model.llm.hidden_size=1024", *extra])
    rc = from_dict(RolloutConfig, data)
    rc.validate(cfg)
    return rc


def test_rollout_config_defaults_and_errors():
    rc = _rollout({})
    assert rc.backend == "vllm" and rc.kv_cache_bytes > 0 and rc.weight_push_bucket_bytes > 0
    for data, msg in [({"backend": "sglang"}, "not one of"), ({"kv_cache_bytes": 0}, "kv_cache_bytes"),
                      ({"backend": "native", "tensor_parallel_size": 4}, "training TP"),
                      ({"unknown_key": 1}, "unknown config key")]:
        with pytest.raises(ConfigError, match=msg):
            _rollout(data, tp=2)
    _rollout({"backend": "native", "tensor_parallel_size": 2}, tp=2)  # the training TP is fine
    assert load_config(None, ["rollout.backend=native"]).rollout.backend == "native"
    with pytest.raises(ConfigError, match="rollout.kv_cach"):
        load_config(None, ["rollout.kv_cache=1"])  # unknown key, with a suggestion


def test_stop_ids_and_image_ids_come_from_the_tokenizer(tmp_path):
    """One helper for every caller: the chat end and EOS where the tokenizer has them; ids a tokenizer lacks
    (None, or its unknown id, depending on the transformers version) never become stop ids."""
    from transformers import AutoTokenizer

    from engine.rollout.base import image_token_ids, stop_token_ids
    from tests.engine.rollout.tiny import IMG_CONTEXT, IMG_END, IMG_START, VIDEO, write_tokenizer

    tiny = AutoTokenizer.from_pretrained("assets/tiny_tokenizer")
    assert stop_token_ids(tiny) == [tiny.convert_tokens_to_ids("<|im_end|>")] == [tiny.eos_token_id]
    assert image_token_ids(tiny) == {tiny.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    words = write_tokenizer(tmp_path)  # word-level, unk 'w0' = id 0, no EOS
    assert words.convert_tokens_to_ids("<|im_end|>") in (None, 0) and words.eos_token_id is None
    assert stop_token_ids(words) == []
    assert image_token_ids(words) == {IMG_START, IMG_END, IMG_CONTEXT, VIDEO}
