"""Decoding modes as data the rollout engine applies (R1V3 §6, R1V §2.6):

  think    the prompt ends with `<think>` opened after the assistant tag (slow thinking)
  nothink  no `<think>` opened (the prompt ends at the assistant tag, plus `nothink_suffix`)
  nowait   think + a logit bias (-inf) on every token id of the banned words ("Wait", "Alternatively", "Hmm")
  budget   think + after N thinking tokens force `</think>` (and an optional answer prefix), then answer
AL-CoTD: a per-sample repetition penalty P = min(2, exp(α(1 - (Ŝ_v + βŜ_t + γŜ_I)/(1+β+γ)))) from
min-max-scaled scores, applied with the HF/CTRL repetition-penalty convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

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


def force_tokens(logits: torch.Tensor, forced: Sequence[int | None]) -> torch.Tensor:
    """Rows with a forced token get -inf everywhere else (greedy and sampling then pick it). [B, V] in place."""
    for row, tok in enumerate(forced):
        if tok is not None:
            keep = logits[row, tok].clone()
            logits[row].fill_(float("-inf"))
            logits[row, tok] = keep if torch.isfinite(keep) else 0.0
    return logits


# ---------------------------------------------------------------- logit bias (NoWait)
def banned_word_bias(tokenizer: Any, words: Iterable[str] = DEFAULT_BANNED_WORDS, bias: float = float("-inf"),
                     multi_token: MultiTokenPolicy = "auto") -> dict[int, float]:
    """{token id: bias} for the ids of every variant of `words` (leading space, case; see
    tokens.word_token_ids). 'auto' bans every single-token variant and, for a word with none, the first
    piece; 'all' also bans every piece of split variants (those pieces then vanish from other words too)."""
    return {i: bias for i in sorted(word_token_ids(tokenizer, words, multi_token=multi_token))}


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """logits[..., id] += bias[id]; [.., V] in place."""
    if bias:
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[..., ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


# ---------------------------------------------------------------- the plan handed to the rollout engine
@dataclass(frozen=True)
class DecodingPlan:
    mode: DecodingModeName
    prompt_suffix: str                             # appended after the assistant tag
    logit_bias: dict[int, float] = field(default_factory=dict)
    budget: ThinkingBudget | None = None
    starts_in_thinking: bool = True

    def prompt(self, chat_prompt: str) -> str:
        """`chat_prompt` ends with the assistant tag (`<|im_start|>assistant\\n`)."""
        return chat_prompt + self.prompt_suffix


def build_decoding_plan(mode: DecodingModeName, tokenizer: Any = None, *, banned_words: Iterable[str] = DEFAULT_BANNED_WORDS,
                        ban_bias: float = float("-inf"), thinking_budget: int | None = None,
                        answer_prefix: str = "", think_suffix: str = "\n", nothink_suffix: str = "",
                        ban_multi_token: MultiTokenPolicy = "auto") -> DecodingPlan:
    if mode == "nothink":
        return DecodingPlan(mode, nothink_suffix, starts_in_thinking=False)
    if mode not in ("think", "nowait", "budget"):
        raise ValueError(f"unknown decoding mode {mode!r}; choose think, nothink, nowait or budget")
    suffix = THINK_OPEN + think_suffix
    if mode == "think":
        return DecodingPlan(mode, suffix)
    if tokenizer is None:
        raise ValueError(f"decoding mode {mode!r} needs the tokenizer (token ids of banned words / '</think>')")
    if mode == "nowait":
        return DecodingPlan(mode, suffix, logit_bias=banned_word_bias(tokenizer, banned_words, ban_bias, ban_multi_token))
    if thinking_budget is None:
        raise ValueError("decoding mode 'budget' needs thinking_budget (tokens), e.g. 1024")
    budget = ThinkingBudget(thinking_budget, tuple(encode_plain(tokenizer, THINK_CLOSE)),
                            tuple(encode_plain(tokenizer, answer_prefix)) if answer_prefix else ())
    return DecodingPlan(mode, suffix, budget=budget)


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


class RepetitionPenaltyProcessor:
    """HF/CTRL convention: for every token id already in input_ids, a positive logit is divided by P and a
    negative one multiplied by P. P is a float or one value per row [B] (AL-CoTD)."""

    def __init__(self, penalty: float | torch.Tensor):
        p = torch.as_tensor(penalty, dtype=torch.float32)
        if bool((p <= 0).any()) or not math.isfinite(float(p.max())):
            raise ValueError(f"repetition penalty must be finite and > 0, got {penalty}")
        self.penalty = p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        p = self.penalty.to(scores.device, scores.dtype)
        p = p.view(-1, 1) if p.dim() == 1 else p  # (B, 1) broadcast over the gathered ids
        seen = torch.gather(scores, 1, input_ids)  # (B, T)
        seen = torch.where(seen < 0, seen * p, seen / p)
        return scores.scatter(1, input_ids, seen)


def decoding_plan_from_config(cfg: Any, tokenizer: Any = None) -> DecodingPlan:
    """From an engine.config.algorithm.DecodingConfig (algorithm.decoding)."""
    return build_decoding_plan(cfg.mode, tokenizer, banned_words=cfg.banned_words, ban_bias=cfg.ban_bias,
                               thinking_budget=cfg.thinking_budget, answer_prefix=cfg.answer_prefix,
                               ban_multi_token=cfg.ban_multi_token)
