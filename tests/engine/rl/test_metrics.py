import math

import pytest
import torch

from engine.rl.metrics import (
    critical_token_entropy, entropy_from_logits, hallucination_rate, high_entropy_fraction, reasoning_word_token_ids,
    rl_step_metrics,
)


def test_reasoning_word_ids_cover_variants(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = reasoning_word_token_ids(tok, ("Wait", "Hmm", "Alternatively"))
    single = {tok.token_to_id(t) for t in ("Wait", "ĠWait", "wait", "Ġwait", "Hmm", "ĠHmm", "hmm", "Ġhmm",
                                            "ĠAlternatively")}
    assert None not in single and ids == single  # split "A|lt|ernatively" adds no piece: " Alternatively" is one token
    # no variant of "Catnip" is one token: the first visible piece of each variant stands for it
    # (a lone space piece "Ġ" of " Catnip" = Ġ|C|at|n|i|p is skipped)
    split = reasoning_word_token_ids(tok, ("Catnip",))
    assert split == {tok.token_to_id(t) for t in ("C", "c", "Ġcat")}


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    h = entropy_from_logits(logits)
    assert h[0, 0] == pytest.approx(math.log(4)) and h[0, 1] == pytest.approx(0.0, abs=1e-6)


def test_critical_token_entropy_and_high_entropy_fraction():
    entropy = torch.tensor([[1.0, 7.0, 2.0, 9.0], [3.0, 4.0, 8.0, 0.5]])
    token_ids = torch.tensor([[5, 11, 5, 12], [11, 6, 12, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the last "11" is padding
    mean, count = critical_token_entropy(entropy, token_ids, mask, {11, 12})
    assert count == 4 and mean == pytest.approx((7.0 + 9.0 + 3.0 + 8.0) / 4)
    assert high_entropy_fraction(entropy, mask, 6.8) == pytest.approx(3 / 7)
    assert critical_token_entropy(entropy, token_ids, mask, {99}) == (None, 0)


def test_hallucination_rate_only_reads_reasoning():
    responses = [
        "<think>I can’t see the image, so I guess.</think>Answer: 3",     # curly apostrophe
        "<think>The image shows a triangle.</think>There is no image issue here",  # phrase only in the answer
        "Sorry, I cannot see the image.",                                  # no tags: whole text is reasoning
        "<think>fine</think>4",
    ]
    assert hallucination_rate(responses) == pytest.approx(2 / 4)
    assert hallucination_rate(responses, phrases=["triangle"]) == pytest.approx(1 / 4)
    assert hallucination_rate([]) is None


def test_rl_step_metrics_keys_and_values(bpe_tokenizer):
    wait_id = bpe_tokenizer.token_to_id("ĠWait")
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    comps = {"rule": torch.tensor([1.0, 0.0, 1.0, 1.0]), "accuracy": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    entropy = torch.tensor([[1.0, 7.0], [2.0, 3.0], [1.0, 1.0], [1.0, 1.0]])
    token_ids = torch.tensor([[1, wait_id], [2, 3], [wait_id, 4], [5, 6]])
    mask = torch.ones(4, 2)
    m = rl_step_metrics(rewards=rewards, reward_components=comps, advantages=torch.tensor([0.5, -1.5, 0.5, 0.0]),
                        response_lengths=torch.tensor([10, 20, 30, 40]), entropy=entropy, token_ids=token_ids,
                        loss_mask=mask, critical_ids=reasoning_word_token_ids(bpe_tokenizer),
                        responses=["<think>no image</think>1"] + ["<think>ok</think>2"] * 3,
                        ratio_with_buffer=1.0, reward_counter={"rule.timeout": 2})
    assert m["reward_mean"] == 0.75 and m["reward_std"] == pytest.approx(math.sqrt(0.1875))
    assert m["accuracy"] == 0.75 and m["reward_rule_mean"] == 0.75
    assert m["effective_sample_ratio"] == 0.75 and m["effective_sample_ratio_with_buffer"] == 1.0
    assert m["response_length_mean"] == 25.0
    assert m["critical_token_entropy"] == pytest.approx((7.0 + 1.0) / 2) and m["critical_token_count"] == 2
    assert m["high_entropy_frac"] == pytest.approx(1 / 8) and m["entropy_mean"] == pytest.approx(17 / 8)
    assert m["hallucination_rate"] == 0.25 and m["reward_skipped/rule.timeout"] == 2
    assert "clip_frac_high" not in m  # loss statistics come from the loss reports, not from here


def test_best_checkpoint():
    from engine.rl.metrics import best_checkpoint
    records = [{"step": 1, "critical_token_entropy": 1.5}, {"step": 2, "critical_token_entropy": None},
               {"step": 3, "critical_token_entropy": 2.5, "val_accuracy": 0.1}, {"step": 4, "val_accuracy": 0.4}]
    assert best_checkpoint(records) == 3
    assert best_checkpoint(records, by="val_accuracy") == 4
    assert best_checkpoint([{"step": 1}]) is None


def test_logprob_mismatch():
    from engine.rl.metrics import logprob_mismatch
    train = torch.tensor([[-1.0, -2.0, -3.0]])
    rollout = torch.tensor([[-1.0, -2.5, -9.0]])
    m = logprob_mismatch(train, rollout, torch.tensor([[1, 1, 0]]))  # the last token is padding
    assert m["logprob_diff_mean_abs"] == pytest.approx(0.25) and m["logprob_diff_max_abs"] == pytest.approx(0.5)
    assert m["train_rollout_kl"] == pytest.approx((0.0 + math.exp(-0.5) + 0.5 - 1) / 2)
    assert logprob_mismatch(train, rollout, torch.zeros(1, 3))["train_rollout_kl"] is None
