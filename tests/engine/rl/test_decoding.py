import math

import pytest
import torch

from engine.rl.decoding import ThinkingBudget, alcotd_penalty, banned_word_bias, build_decoding_plan, minmax_scale
from engine.rollout.sampling import apply_logit_bias


def test_prompt_template_per_mode(bpe_tokenizer):
    assert build_decoding_plan("think").thinking == "think"
    assert build_decoding_plan("nothink").thinking == "no_think"  # the prompt does not open <think>
    assert build_decoding_plan("nowait", bpe_tokenizer).thinking == "think"
    with pytest.raises(ValueError, match="thinking_budget"):
        build_decoding_plan("budget", bpe_tokenizer)
    with pytest.raises(ValueError, match="unknown decoding mode"):
        build_decoding_plan("fast")


def test_nowait_bans_every_variant_and_greedy_avoids_them(bpe_tokenizer):
    tok = bpe_tokenizer
    plan = build_decoding_plan("nowait", tok, banned_words=("Wait", "Hmm", "Alternatively"))
    banned = {tok.token_to_id(t) for t in ("Wait", "ĠWait", "wait", "Ġwait", "Hmm", "ĠHmm", "hmm", "Ġhmm",
                                            "ĠAlternatively")}
    assert set(plan.logit_bias) == banned and all(v == -math.inf for v in plan.logit_bias.values())
    everything = banned_word_bias(tok, ("Alternatively",), bias=-100.0, multi_token="all")
    assert {tok.token_to_id(t) for t in ("A", "lt", "ernatively")} <= set(everything)
    assert set(everything.values()) == {-100.0}
    vocab = tok.get_vocab_size()
    logits = torch.zeros(2, vocab)
    logits[:, sorted(banned)] = 50.0  # the model wants to say "Wait"
    logits[1, 7] = 10.0
    out = apply_logit_bias(logits, plan.logit_bias)  # what the native engine applies (vLLM: the same bias, clamped)
    assert int(out[1].argmax()) == 7 and int(out[0].argmax()) not in banned


def test_thinking_budget_forces_close_tag_and_answer_prefix():
    tb = ThinkingBudget(budget=3, think_end_ids=(1,), answer_prefix_ids=(50, 51))
    s = tb.start()
    for tok in (10, 11):
        assert tb.forced_token(s) is None
        s = tb.advance(s, tok)
    s = tb.advance(s, 12)  # third thinking token: budget reached
    forced = []
    while tb.forced_token(s) is not None:
        forced.append(tb.forced_token(s))
        s = tb.advance(s, forced[-1])
    assert forced == [1, 50, 51] and not s.thinking and s.thought == 3
    assert tb.advance(s, 99) == s  # answering: free
    with pytest.raises(ValueError, match="forced token"):
        tb.advance(tb.advance(tb.advance(tb.advance(tb.start(), 10), 11), 12), 77)


def test_thinking_budget_model_closes_early_and_multi_token_tag():
    tb = ThinkingBudget(budget=5, think_end_ids=(7, 8))
    s = tb.start()
    for tok in (10, 7, 8):
        s = tb.advance(s, tok)
    assert not s.thinking and tb.forced_token(s) is None  # closed by the model itself
    tb3 = ThinkingBudget(budget=3, think_end_ids=(7, 8))
    s = tb3.start()
    for tok in (10, 11, 7):  # budget hits while '</think>' is half emitted: only complete it
        s = tb3.advance(s, tok)
    assert s.forced == (8,)
    assert ThinkingBudget(0, (1,)).start().forced == (1,)  # budget 0: close at once


def test_budget_in_a_sampling_loop(bpe_tokenizer):
    plan = build_decoding_plan("budget", bpe_tokenizer, thinking_budget=4, answer_prefix="Answer:")
    end_ids = bpe_tokenizer.encode("</think>", add_special_tokens=False).ids
    tb, g = plan.budget, torch.Generator().manual_seed(0)
    states, seqs = [tb.start(), tb.start()], [[], []]
    vocab = bpe_tokenizer.get_vocab_size()
    for _ in range(12):
        logits = torch.randn(2, vocab, generator=g)
        logits[:, end_ids] = -1e9  # this "model" never closes on its own
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).flatten().tolist()
        for b in range(2):
            tok = tb.forced_token(states[b])
            seqs[b].append(nxt[b] if tok is None else tok)
            states[b] = tb.advance(states[b], seqs[b][-1])
    answer_ids = bpe_tokenizer.encode("Answer:", add_special_tokens=False).ids
    for seq in seqs:
        assert seq[4:4 + len(end_ids) + len(answer_ids)] == end_ids + answer_ids
        assert bpe_tokenizer.decode(seq[4:], skip_special_tokens=False).startswith("</think>Answer:")


def test_alcotd_penalty_by_hand():
    s_v, s_t, s_i = torch.tensor([0.0, 5.0, 10.0]), torch.tensor([1.0, 1.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])
    # scaled: v = [0, .5, 1], t = [0, 0, 1], i = [0, .5, 1]; (v + t + i) / 3 = [0, 1/3, 1]
    p = alcotd_penalty(s_v, s_t, s_i, alpha=1.0, beta=1.0, gamma=1.0)
    assert p.tolist() == pytest.approx([2.0, math.exp(2 / 3), 1.0], rel=1e-6)  # exp(1) = 2.72 capped at 2
    p = alcotd_penalty(s_v, s_t, s_i, alpha=0.5, beta=2.0, gamma=0.0)
    # (v + 2t) / 3 = [0, 1/6, 1]
    assert p.tolist() == pytest.approx([math.exp(0.5), math.exp(0.5 * 5 / 6), 1.0], rel=1e-6)
    assert minmax_scale(torch.tensor([3.0, 3.0])).tolist() == [0.5, 0.5]


def test_plan_from_config(bpe_tokenizer):
    from engine.config.algorithm import DecodingConfig
    from engine.rl.decoding import decoding_plan_from_config
    plan = decoding_plan_from_config(DecodingConfig(mode="nowait", banned_words=["Hmm"], ban_bias=-100.0), bpe_tokenizer)
    assert plan.logit_bias == {bpe_tokenizer.token_to_id(t): -100.0 for t in ("Hmm", "ĠHmm", "hmm", "Ġhmm")}
    plan = decoding_plan_from_config(DecodingConfig(mode="budget", thinking_budget=2), bpe_tokenizer)
    assert plan.budget.budget == 2 and plan.budget.think_end_ids == (bpe_tokenizer.token_to_id("</think>"),)
