"""Generate through any rollout engine with a decoding plan (engine/rl/decoding.py): the plan's logit
bias (nowait bans) and its thinking budget (budget mode). GRPO rollouts and evaluation both call this.

The thinking budget runs in rounds of ordinary `generate` calls, so it works the same on every backend:
  1. sample up to `budget` thinking tokens, stopping early at the end of '</think>' or a stop token;
  2. replay each sample through the `ThinkingBudget` state machine: a sample still thinking at the
     budget gets the rest of '</think>' (+ the answer prefix) appended as *forced* tokens (log-prob 0,
     `Completion.forced` True: the policy did not sample them, so GRPO keeps them out of the loss);
  3. continue every unfinished sample (prompt + tokens so far, one request each) until a stop token or
     `max_tokens` in total. A multi-token '</think>' whose last piece appeared alone goes back to 1.
Seeds: round r uses `params.seed + r` (None stays None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.rl.decoding import BudgetState, DecodingPlan, ThinkingBudget
from engine.rollout.base import Completion, GenerationRequest, GenerationResult, RolloutEngine, SamplingParams


def generate_with_plan(engine: RolloutEngine, requests: list[GenerationRequest], params: SamplingParams,
                       plan: DecodingPlan) -> list[GenerationResult]:
    """`engine.generate(requests, params)` with the plan applied. The plan's logit bias is added to the
    caller's (the caller's value wins for an id in both, e.g. GRPO's image-token bans)."""
    params = dataclasses.replace(params, logit_bias={**plan.logit_bias, **params.logit_bias})
    if plan.budget is None:
        return engine.generate(requests, params)
    return _generate_with_budget(engine, requests, params, plan.budget)


@dataclass
class _Sample:
    request: int                 # index into the caller's requests
    state: BudgetState
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    done: bool = False


def _append(s: _Sample, tb: ThinkingBudget, ids: list[int], logprobs: list[float], forced: bool) -> None:
    for tok, lp in zip(ids, logprobs):
        s.ids.append(tok)
        s.logprobs.append(lp)
        s.forced.append(forced)
        s.state = tb.advance(s.state, tok)


def _generate_with_budget(engine: RolloutEngine, requests: list[GenerationRequest], params: SamplingParams,
                          tb: ThinkingBudget) -> list[GenerationResult]:
    stops = set(params.stop_token_ids)
    samples = [_Sample(i, tb.start()) for i in range(len(requests)) for _ in range(params.n)]
    for round_ in range(params.max_tokens + 1):  # every round adds >= 1 token to each sample it generates for
        groups: dict[tuple[int, bool], list[_Sample]] = {}  # (max new tokens, still thinking) -> samples
        for s in samples:
            if s.done:
                continue
            if s.state.forced:  # the budget ran out: close the thinking (+ answer prefix), not sampled
                room = params.max_tokens - len(s.ids)
                forced = list(s.state.forced)[:room]
                _append(s, tb, forced, [0.0] * len(forced), forced=True)
            if (s.ids and s.ids[-1] in stops) or len(s.ids) >= params.max_tokens:
                s.done = True
                continue
            room = params.max_tokens - len(s.ids)
            if s.state.thinking:
                room = min(room, tb.budget - s.state.thought)
            groups.setdefault((room, s.state.thinking), []).append(s)
        if not groups:
            break
        for (room, thinking), members in groups.items():
            seed = None if params.seed is None else params.seed + round_
            stop = sorted(stops | ({tb.think_end_ids[-1]} if thinking else set()))
            if round_ == 0 and not members[0].ids:  # every sample at its start: one request per prompt, n samples each
                call = dataclasses.replace(params, max_tokens=room, stop_token_ids=stop, seed=seed)
                results = engine.generate(requests, call)
                completions = [c for r in results for c in r.completions]
            else:
                call = dataclasses.replace(params, n=1, max_tokens=room, stop_token_ids=stop, seed=seed)
                batch = [dataclasses.replace(requests[s.request], prompt_token_ids=requests[s.request].prompt_token_ids
                                             + s.ids) for s in members]
                completions = [r.completions[0] for r in engine.generate(batch, call)]
            for s, c in zip(members, completions):
                _append(s, tb, c.token_ids, c.logprobs, forced=False)
                engine_limit = c.finish_reason == "length" and len(c.token_ids) < room  # its max_model_len
                if not thinking or engine_limit:  # answering: this round ran to a stop token or the length limit
                    s.done = True
    results = [GenerationResult(r.request_id, list(r.prompt_token_ids), []) for r in requests]
    for s in samples:
        finish = "stop" if s.ids and s.ids[-1] in stops else "length"
        results[s.request].completions.append(Completion(s.ids, s.logprobs, finish, engine.decode(s.ids),
                                                         forced=s.forced if any(s.forced) else None))
    return results
