"""Rewards, pluggable by name (algorithm.reward.name): rule accuracy, format, model verifier, and
their R1V / R1V2 / R1V3 combinations. A component that errors or times out on a sample gives 0
for it and is counted in the RewardCounter returned with the rewards.

  rule:     1 if the final answer (last \\boxed{} or `Answer:` after </think>) matches the gold answer
            (multiple-choice letter, exact string, or math-verify equivalence), else 0
  format:   1 if the response is `<think>reasoning</think>answer` with non-empty reasoning and answer
  verifier: 1 if a judge model (called through `generate(prompts) -> texts`) answers "yes"
  r1v  = rule + format                       (R1V GRPO: accuracy + format)
  r1v2 = rule + verifier + format            (R1V2 hybrid reward r_rule + r_θ + r_format)
  r1v3 = ε·max(rule, verifier) + (1-ε)·format  (R1V3, ε = 0.8: acc = rule OR verifier)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from engine.rl.answer_extraction import THINK_CLOSE, THINK_OPEN, extract_choice, extract_final_answer, is_choice_gold, split_think
from engine.rl.math_check import MathVerifier

GenerateFn = Callable[[list[str]], list[str]]

DEFAULT_VERIFIER_TEMPLATE = (
    "You are checking a student's final answer against the reference answer.\n"
    "Question: {question}\nReference answer: {gold}\nStudent answer: {answer}\n"
    "Are they equivalent? Reply with yes or no."
)


@dataclass
class RewardSample:
    prompt: str
    response: str
    gold: str
    sample_id: Any = None


class RewardCounter(Counter):
    """Counts events per '<component>.<event>' (rule.timeout, rule.error, rule.no_answer,
    verifier.error, verifier.unparsable, ...)."""

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.items()))


@dataclass
class RewardResult:
    total: torch.Tensor                      # [N] float
    components: dict[str, torch.Tensor]      # name -> [N] (always includes 'accuracy' when one is computed)
    counter: RewardCounter = field(default_factory=RewardCounter)


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$").rstrip(".").lower()


class RuleAccuracyReward:
    name = "rule"

    def __init__(self, verifier: MathVerifier):
        self.verifier = verifier

    def __call__(self, samples: Sequence[RewardSample], counter: RewardCounter) -> list[float]:
        scores = [0.0] * len(samples)
        to_verify: list[tuple[int, str, str]] = []
        for i, s in enumerate(samples):
            try:
                pred = extract_final_answer(s.response)
                if pred is None:
                    counter["rule.no_answer"] += 1
                    continue
                if is_choice_gold(s.gold):
                    scores[i] = float(extract_choice(pred) == extract_choice(s.gold))
                elif _normalise(pred) == _normalise(s.gold):
                    scores[i] = 1.0
                else:
                    to_verify.append((i, pred, s.gold))
            except Exception:  # noqa: BLE001 - counted, reward 0
                counter["rule.error"] += 1
        verdicts = self.verifier.check_many([(p, g) for _, p, g in to_verify])
        for (i, _, _), (verdict, _msg) in zip(to_verify, verdicts):
            if verdict == "equal":
                scores[i] = 1.0
            elif verdict in ("timeout", "error"):
                counter[f"rule.{verdict}"] += 1
        return scores


class FormatReward:
    """`<think>` + non-empty reasoning + `</think>` + non-empty answer, each tag exactly once.
    prompt_opens_think=True: the prompt already ends with `<think>` (think mode), so the response
    starts inside the reasoning."""
    name = "format"

    def __init__(self, prompt_opens_think: bool = False):
        self.prompt_opens_think = prompt_opens_think

    def score(self, response: str) -> float:
        text = response
        if self.prompt_opens_think and not text.lstrip().startswith(THINK_OPEN):
            text = THINK_OPEN + text
        if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
            return 0.0
        m = re.fullmatch(r"\s*<think>(.*?)</think>(.*)", text, re.DOTALL)
        return float(bool(m and m.group(1).strip() and m.group(2).strip()))

    def __call__(self, samples: Sequence[RewardSample], counter: RewardCounter) -> list[float]:
        return [self.score(s.response) for s in samples]


def parse_yes_no(judge_text: str) -> bool | None:
    """Judge verdict: \\boxed{yes|no} if present, else the first 'yes'/'no' word after any reasoning."""
    _, answer = split_think(judge_text)
    answer = judge_text if answer is None else answer
    for source in (re.findall(r"\\boxed\{\s*(yes|no)\s*\}", answer, re.IGNORECASE),
                   re.findall(r"\b(yes|no)\b", answer, re.IGNORECASE)):
        if source:
            return source[0].lower() == "yes"
    return None


class ModelVerifierReward:
    """A judge model through the rollout engine: `generate(prompts) -> texts`, one text per prompt.
    The template gets {question}, {gold} and {answer} (the extracted final answer, or the answer part)."""
    name = "verifier"

    def __init__(self, generate: GenerateFn, template: str = DEFAULT_VERIFIER_TEMPLATE):
        for key in ("{question}", "{gold}", "{answer}"):
            if key not in template:
                raise ValueError(f"verifier template must contain {key}; got {template!r}")
        self.generate, self.template = generate, template

    def __call__(self, samples: Sequence[RewardSample], counter: RewardCounter) -> list[float]:
        scores = [0.0] * len(samples)
        asked: list[int] = []
        prompts: list[str] = []
        for i, s in enumerate(samples):
            _, answer_part = split_think(s.response)
            answer = extract_final_answer(s.response) or (answer_part or "").strip()
            if not answer:
                counter["verifier.no_answer"] += 1
                continue
            asked.append(i)
            prompts.append(self.template.format(question=s.prompt, gold=s.gold, answer=answer))
        if not prompts:
            return scores
        try:
            texts = self.generate(prompts)
            if len(texts) != len(prompts):
                raise ValueError(f"generate returned {len(texts)} texts for {len(prompts)} prompts")
        except Exception:  # noqa: BLE001 - judge failure: 0 for every asked sample, counted
            counter["verifier.error"] += len(prompts)
            return scores
        for i, text in zip(asked, texts):
            verdict = parse_yes_no(text)
            if verdict is None:
                counter["verifier.unparsable"] += 1
            scores[i] = float(bool(verdict))
        return scores


# name -> (components it needs, how they combine into the total)
Combiner = Callable[[dict[str, torch.Tensor], float], torch.Tensor]
REWARDS: dict[str, tuple[tuple[str, ...], Combiner]] = {
    "rule": (("rule",), lambda c, eps: c["rule"]),
    "format": (("format",), lambda c, eps: c["format"]),
    "verifier": (("verifier",), lambda c, eps: c["verifier"]),
    "r1v": (("rule", "format"), lambda c, eps: c["rule"] + c["format"]),
    "r1v2": (("rule", "verifier", "format"), lambda c, eps: c["rule"] + c["verifier"] + c["format"]),
    "r1v3": (("rule", "verifier", "format"),
             lambda c, eps: eps * torch.maximum(c["rule"], c["verifier"]) + (1 - eps) * c["format"]),
    # R1V3's mix with the rule check alone as accuracy (no judge model, e.g. when the policy is too small to judge)
    "r1v3_rule": (("rule", "format"), lambda c, eps: eps * c["rule"] + (1 - eps) * c["format"]),
}


def register_reward(name: str, components: tuple[str, ...], combine: Combiner) -> None:
    """Add a named combination of the components 'rule' / 'format' / 'verifier'; combine(components, ε) -> [N]."""
    unknown = set(components) - {"rule", "format", "verifier"}
    if unknown:
        raise ValueError(f"reward {name!r}: unknown components {sorted(unknown)}; use rule, format, verifier")
    REWARDS[name] = (tuple(components), combine)


class RewardFunction:
    """Computes a named reward over a batch; build with `build_reward`."""

    def __init__(self, name: str, components: dict[str, Callable], epsilon: float = 0.8):
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
        self.name, self.components, self.epsilon = name, components, epsilon

    def __call__(self, samples: Sequence[RewardSample]) -> RewardResult:
        counter = RewardCounter()
        comps: dict[str, torch.Tensor] = {}
        for cname, fn in self.components.items():
            try:
                comps[cname] = torch.tensor(fn(samples, counter), dtype=torch.float32)
            except Exception:  # noqa: BLE001 - a whole component failing: zeros, counted per sample
                counter[f"{cname}.error"] += len(samples)
                comps[cname] = torch.zeros(len(samples))
        total = REWARDS[self.name][1](comps, self.epsilon)
        acc = [comps[k] for k in ("rule", "verifier") if k in comps]
        if acc:
            comps["accuracy"] = torch.stack(acc).amax(dim=0)  # rule OR verifier
        return RewardResult(total=total, components=comps, counter=counter)


def build_reward(name: str, *, epsilon: float = 0.8, math_verifier: MathVerifier | None = None,
                 generate: GenerateFn | None = None, verifier_template: str = DEFAULT_VERIFIER_TEMPLATE,
                 prompt_opens_think: bool = False) -> RewardFunction:
    """The reward named `name` with the components it needs; a verifier reward needs `generate`."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)} (algorithm.reward.name)")
    needed = REWARDS[name][0]
    components: dict[str, Callable] = {}
    for cname in needed:
        if cname == "rule":
            components["rule"] = RuleAccuracyReward(math_verifier or MathVerifier())
        elif cname == "format":
            components["format"] = FormatReward(prompt_opens_think)
        elif cname == "verifier":
            if generate is None:
                raise ValueError(f"reward {name!r} needs a judge model: pass generate=<rollout engine generate>, "
                                 "or choose a reward without 'verifier' (rule, format, r1v)")
            components["verifier"] = ModelVerifierReward(generate, verifier_template)
    return RewardFunction(name, components, epsilon)


def build_reward_from_config(cfg: Any, *, generate: GenerateFn | None = None,
                             math_verifier: MathVerifier | None = None) -> RewardFunction:
    """From an engine.config.algorithm.RewardConfig (algorithm.reward)."""
    verifier = math_verifier or MathVerifier(cfg.math_verify_timeout_s, cfg.math_verify_workers, cfg.math_verify_backend)
    return build_reward(cfg.name, epsilon=cfg.epsilon, math_verifier=verifier, generate=generate,
                        verifier_template=cfg.verifier_template or DEFAULT_VERIFIER_TEMPLATE,
                        prompt_opens_think=cfg.prompt_opens_think)
