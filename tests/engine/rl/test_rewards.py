"""Rewards on a table of answer forms, with a real math-verify worker pool and a real (tiny, pure-Python)
judge callable standing in for the rollout engine's generate()."""

import re
import threading

import pytest
import torch

from engine.config.algorithm import RewardConfig
from engine.rl.math_check import MathVerifier
from engine.rl.rewards import (
    FormatReward, ModelVerifierReward, RewardCounter, RewardSample, RuleAccuracyReward, build_reward,
    build_reward_from_config, parse_yes_no,
)


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=30.0, workers=2) as mv:
        yield mv


RULE_TABLE = [  # (response, gold, reward)
    (r"<think>r</think>So \boxed{\frac{32}{3}\pi}", r"32\pi/3", 1.0),          # π, bare gold
    (r"<think>r</think>\boxed{0.5}", r"\frac{1}{2}", 1.0),                       # fraction vs decimal
    (r"<think>r</think>\boxed{\frac{2}{4}}", "1/2", 1.0),
    (r"<think>r</think>\boxed{3.14}", r"\pi", 0.0),
    (r"<think>r</think>\boxed{\pi}", r"$\pi$", 1.0),                             # gold already in $...$
    (r"<think>r</think>\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1.0),                 # sets
    (r"<think>r</think>\boxed{(0, 1]}", "(0,1]", 1.0),                           # intervals
    (r"<think>r</think>\boxed{[0,1]}", "(0,1]", 0.0),
    (r"<think>r</think>\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),   # nested braces
    ("<think>r</think>Answer: (B)", "B", 1.0),                                    # letters
    (r"<think>r</think>\boxed{B}", "(B)", 1.0),
    ("<think>r</think>Answer: B. 42", "B", 1.0),
    ("<think>r</think>Answer: C.", "B", 0.0),
    ("<think>r</think>Answer: x = 3", "3", 1.0),
    (r"<think>\boxed{4}</think>I think \boxed{3} no \boxed{5}", "5", 1.0),       # last box after </think>
    (r"\boxed{4}", "4", 1.0),                                                    # no think tags: rule still scores
    (r"<think>\boxed{4} and then truncated", "4", 0.0),                          # unclosed think: no answer
    (r"<think>r</think>\boxed{4", "4", 0.0),                                     # malformed box
    ("<think>r</think>I don't know", "4", 0.0),
]


def test_rule_accuracy_table(verifier):
    samples = [RewardSample("q", resp, gold) for resp, gold, _ in RULE_TABLE]
    counter = RewardCounter()
    scores = RuleAccuracyReward(verifier)(samples, counter)
    bad = [(r, g, s) for (r, g, want), s in zip(RULE_TABLE, scores) if s != want]
    assert not bad, f"wrong rule rewards: {bad}"
    assert counter["rule.no_answer"] == 3


@pytest.mark.parametrize("response,opens,want", [
    ("<think>reason</think>answer", False, 1.0),
    ("  <think>\nreason\n</think>\n\nThe answer is 3", False, 1.0),
    ("<think>reason</think>   ", False, 0.0),           # empty answer
    ("<think> </think>answer", False, 0.0),             # empty reasoning
    ("reason</think>answer", True, 1.0),                # prompt opened <think>
    ("reason</think>answer", False, 0.0),
    ("no tags at all", False, 0.0),
    ("<think>a</think><think>b</think>c", False, 0.0),  # tags twice
    ("<think>never closed", False, 0.0),
])
def test_format_reward(response, opens, want):
    assert FormatReward(prompt_opens_think=opens).score(response) == want


def tiny_judge(prompts):
    """A real judge: reads the template fields back and answers like a chatty model."""
    out = []
    for p in prompts:
        gold = re.search(r"Reference answer: (.*)", p).group(1).strip()
        ans = re.search(r"Student answer: (.*)", p).group(1).strip()
        if ans == "???":
            out.append("I am not sure.")
        elif ans.replace(" ", "") == gold.replace(" ", ""):
            out.append("<think>Comparing... no difference.</think>Yes, they match.")
        else:
            out.append("No. The student's answer differs; yes, I checked.")
    return out


def test_parse_yes_no():
    assert parse_yes_no("<think>yes? no?</think>No.") is False
    assert parse_yes_no(r"The verdict: \boxed{yes}. No doubt.") is True
    assert parse_yes_no("Yes. There is no difference") is True
    assert parse_yes_no("maybe") is None


def test_model_verifier_reward_counts_unparsable_and_errors():
    samples = [RewardSample("q1", r"<think>r</think>\boxed{x+1}", "x + 1"),
               RewardSample("q2", r"<think>r</think>\boxed{2}", "3"),
               RewardSample("q3", r"<think>r</think>\boxed{???}", "3"),
               RewardSample("q4", "<think>truncated", "3")]
    counter = RewardCounter()
    scores = ModelVerifierReward(tiny_judge)(samples, counter)
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert counter == {"verifier.unparsable": 1, "verifier.no_answer": 1}

    def broken(prompts):
        raise RuntimeError("judge engine crashed")

    counter = RewardCounter()
    assert ModelVerifierReward(broken)(samples, counter) == [0.0] * 4
    assert counter["verifier.error"] == 3
    with pytest.raises(ValueError, match="{answer}"):
        ModelVerifierReward(tiny_judge, template="{question} {gold}")


def test_combinations(verifier):
    # rule-only right (math-verify) / rule and judge right / wrong but formatted / right without think tags
    samples = [RewardSample("q", r"<think>r</think>\boxed{1/2}", "0.5"),
               RewardSample("q", r"<think>r</think>\boxed{half}", "half "),   # equal after whitespace normalisation
               RewardSample("q", r"<think>r</think>\boxed{7}", "3"),
               RewardSample("q", r"\boxed{3}", "3")]
    r1v2 = build_reward("r1v2", math_verifier=verifier, generate=tiny_judge)(samples)
    assert r1v2.components["rule"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert r1v2.components["verifier"].tolist() == [0.0, 1.0, 0.0, 1.0]   # judge compares strings: 1/2 != 0.5
    assert r1v2.components["format"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert r1v2.total.tolist() == [2.0, 3.0, 1.0, 2.0]
    r1v3 = build_reward("r1v3", epsilon=0.8, math_verifier=verifier, generate=tiny_judge)(samples)
    assert r1v3.total.tolist() == pytest.approx([1.0, 1.0, 0.2, 0.8])
    assert r1v3.components["accuracy"].tolist() == [1.0, 1.0, 0.0, 1.0]   # rule OR verifier
    r1v = build_reward("r1v", math_verifier=verifier)(samples)
    assert r1v.total.tolist() == [2.0, 2.0, 1.0, 1.0] and "verifier" not in r1v.components
    with pytest.raises(ValueError, match="judge model"):
        build_reward("r1v3", math_verifier=verifier)
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("bleu")


def test_timeout_gives_zero_and_is_counted_from_a_worker_thread():
    cfg = RewardConfig(name="r1v", math_verify_timeout_s=2.0, math_verify_workers=1, prompt_opens_think=False)
    samples = [RewardSample("q", r"<think>r</think>\boxed{9^{9^{9^{9}}}}", "3"),
               RewardSample("q", r"<think>r</think>\boxed{\frac{6}{4}}", "1.5")]
    out = {}
    fn = build_reward_from_config(cfg)
    try:
        t = threading.Thread(target=lambda: out.update(result=fn(samples)))
        t.start()
        t.join()
    finally:
        fn.components["rule"].verifier.close()
    result = out["result"]
    assert result.components["rule"].tolist() == [0.0, 1.0]
    assert result.total.tolist() == [1.0, 2.0]
    assert result.counter.as_dict() == {"rule.timeout": 1}


def test_component_crash_is_zero_and_counted():
    class Exploding:
        def __call__(self, samples, counter):
            raise RuntimeError("boom")

    fn = build_reward("format")
    fn.components["format"] = Exploding()
    res = fn([RewardSample("q", "<think>a</think>b", "x")] * 3)
    assert res.total.tolist() == [0.0, 0.0, 0.0] and res.counter["format.error"] == 3
    assert isinstance(res.total, torch.Tensor)


def test_register_a_new_combination():
    from engine.rl.rewards import REWARDS, register_reward
    register_reward("format_x2", ("format",), lambda c, eps: 2 * c["format"])
    try:
        res = build_reward("format_x2")([RewardSample("q", "<think>a</think>b", "x"), RewardSample("q", "b", "x")])
        assert res.total.tolist() == [2.0, 0.0]
    finally:
        REWARDS.pop("format_x2")
    with pytest.raises(ValueError, match="unknown components"):
        register_reward("bad", ("bleu",), lambda c, eps: c["bleu"])
