"""Decoding modes as data the rollout applies (R1V3 §6, R1V §2.6), used by GRPO rollouts and evaluation
through engine/rollout/decoding.py::generate_with_plan:

  think    the prompt ends with `<think>` opened after the assistant tag (slow thinking)
  nothink  no `<think>` opened (the prompt ends at the assistant tag: data.thinking=no_think)
  nowait   think + a logit bias (-inf) on every token id of the banned words ("Wait", "Alternatively", "Hmm")
  budget   think + after N thinking tokens force `</think>` (and an optional answer prefix), then answer
AL-CoTD: a per-query repetition penalty P = min(2, exp(α(1 - (Ŝ_v + βŜ_t + γŜ_I)/(1+β+γ)))) from
min-max-scaled scores; the engines apply it as SamplingParams.repetition_penalty (HF/CTRL convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal

import torch

from engine.rl.tokens import MultiTokenPolicy, encode_plain, word_token_ids

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DecodingModeName = Literal["think", "nothink", "nowait", "budget"]
DEFAULT_BANNED_WORDS = ("Wait", "Alternatively", "Hmm")  # R1V3 NoWait


# ---------------------------------------------------------------- thinking budget state machine
@dataclass(frozen=True)
class BudgetState:
    thinking: bool               # inside <think> ... </think>
    thought: int = 0             # thinking tokens emitted so far
    forced: tuple[int, ...] = ()  # tokens the engine must emit next, in order
    recent: tuple[int, ...] = ()  # last tokens, to spot a multi-token </think> emitted by the model


@dataclass(frozen=True)
class ThinkingBudget:
    """Pure per-sequence state machine: start() -> loop { forced_token(s) or sample; s = advance(s, tok) }."""
    budget: int
    think_end_ids: tuple[int, ...]
    answer_prefix_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.budget < 0 or not self.think_end_ids:
            raise ValueError(f"ThinkingBudget needs budget >= 0 and the ids of '{THINK_CLOSE}' (got {self.budget}, "
                             f"{self.think_end_ids})")

    def start(self, in_thinking: bool = True) -> BudgetState:
        state = BudgetState(thinking=in_thinking)
        return self._maybe_force(state) if in_thinking else state

    @staticmethod
    def forced_token(state: BudgetState) -> int | None:
        return state.forced[0] if state.forced else None

    def _maybe_force(self, state: BudgetState) -> BudgetState:
        if not state.thinking or state.thought < self.budget:
            return state
        end = self.think_end_ids
        # if the model is midway through emitting </think>, complete it rather than start a new one
        done = max((k for k in range(len(end)) if k and state.recent[-k:] == end[:k]), default=0)
        return BudgetState(thinking=False, thought=state.thought, forced=end[done:] + self.answer_prefix_ids)

    def advance(self, state: BudgetState, token_id: int) -> BudgetState:
        if state.forced:
            if token_id != state.forced[0]:
                raise ValueError(f"thinking budget forced token {state.forced[0]} but the engine emitted {token_id}; "
                                 "apply forced_token() before sampling")
            return replace(state, forced=state.forced[1:])
        if not state.thinking:
            return state
        end = self.think_end_ids
        window = (state.recent + (token_id,))[-len(end):]
        if window == end:
            return BudgetState(thinking=False, thought=state.thought)
        keep = len(end) - 1
        recent = window[-keep:] if keep else ()
        return self._maybe_force(BudgetState(thinking=True, thought=state.thought + 1, recent=recent))


# ---------------------------------------------------------------- logit bias (NoWait)
def banned_word_bias(tokenizer: Any, words: Iterable[str] = DEFAULT_BANNED_WORDS, bias: float = float("-inf"),
                     multi_token: MultiTokenPolicy = "auto") -> dict[int, float]:
    """{token id: bias} for the ids of every variant of `words` (leading space, case; see
    tokens.word_token_ids). 'auto' bans every single-token variant and, for a word with none, the first
    piece; 'all' also bans every piece of split variants (those pieces then vanish from other words too)."""
    return {i: bias for i in sorted(word_token_ids(tokenizer, words, multi_token=multi_token))}


# ---------------------------------------------------------------- the plan handed to the rollout engine
@dataclass(frozen=True)
class DecodingPlan:
    mode: DecodingModeName
    thinking: Literal["think", "no_think"]          # the prompt template (data.thinking): opens '<think>\\n' or not
    logit_bias: dict[int, float] = field(default_factory=dict)
    budget: ThinkingBudget | None = None


def build_decoding_plan(mode: DecodingModeName, tokenizer: Any = None, *, banned_words: Iterable[str] = DEFAULT_BANNED_WORDS,
                        ban_bias: float = float("-inf"), thinking_budget: int | None = None,
                        answer_prefix: str = "", ban_multi_token: MultiTokenPolicy = "auto") -> DecodingPlan:
    if mode == "nothink":
        return DecodingPlan(mode, "no_think")
    if mode not in ("think", "nowait", "budget"):
        raise ValueError(f"unknown decoding mode {mode!r}; choose think, nothink, nowait or budget")
    if mode == "think":
        return DecodingPlan(mode, "think")
    if tokenizer is None:
        raise ValueError(f"decoding mode {mode!r} needs the tokenizer (token ids of banned words / '</think>')")
    if mode == "nowait":
        return DecodingPlan(mode, "think", logit_bias=banned_word_bias(tokenizer, banned_words, ban_bias, ban_multi_token))
    if thinking_budget is None:
        raise ValueError("decoding mode 'budget' needs thinking_budget (tokens), e.g. 1024")
    budget = ThinkingBudget(thinking_budget, tuple(encode_plain(tokenizer, THINK_CLOSE)),
                            tuple(encode_plain(tokenizer, answer_prefix)) if answer_prefix else ())
    return DecodingPlan(mode, "think", budget=budget)


# ---------------------------------------------------------------- AL-CoTD repetition penalty (R1V eq. 1)
def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the given scores; all-equal scores map to 0.5 (no information either way)."""
    x = x.double()
    lo, hi = x.min(), x.max()
    if hi == lo:
        return torch.full_like(x, 0.5)
    return (x - lo) / (hi - lo)


def alcotd_penalty(s_v: torch.Tensor, s_t: torch.Tensor, s_i: torch.Tensor, *, alpha: float, beta: float, gamma: float,
                   scale: bool = True, max_penalty: float = 2.0) -> torch.Tensor:
    """P = min(max_penalty, exp(α(1 - (Ŝ_v + βŜ_t + γŜ_I)/(1+β+γ)))) per query [N]; Ŝ = min-max scaled over the N
    queries when scale=True (else the scores must already lie in [0, 1]). Hard queries (high Ŝ) get P near 1."""
    if scale:
        s_v, s_t, s_i = minmax_scale(s_v), minmax_scale(s_t), minmax_scale(s_i)
    combined = (s_v.double() + beta * s_t.double() + gamma * s_i.double()) / (1.0 + beta + gamma)
    return torch.clamp(torch.exp(alpha * (1.0 - combined)), max=max_penalty).float()


def decoding_plan_from_config(cfg: Any, tokenizer: Any = None) -> DecodingPlan:
    """From an engine.config.algorithm.DecodingConfig (algorithm.decoding)."""
    return build_decoding_plan(cfg.mode, tokenizer, banned_words=cfg.banned_words, ban_bias=cfg.ban_bias,
                               thinking_budget=cfg.thinking_budget, answer_prefix=cfg.answer_prefix,
                               ban_multi_token=cfg.ban_multi_token)
