"""Benchmark evaluation: pass@1 averaged over k samples, per decoding mode (think / nothink / nowait /
budget), with accuracy from the rule check (extraction + math-verify) and the mean response length.

Prompts come from an RL-format JSONL through the same data path as training; generation goes through
the configured rollout engine. Under torchrun every DP rank evaluates its own shard; results are summed.
"""

from __future__ import annotations

import dataclasses
import math

import torch.distributed as dist

from engine.parallel.device import global_sum


def evaluate(cfg, model, pg, modes: list[str], k: int, temperature: float, max_tokens: int,
             budget: int | None = None, limit: int | None = None, engine=None) -> dict:
    """Prompts from cfg.data.train_path. Modes are built like GRPO's (algorithm.decoding: banned words, ban
    bias, answer prefix) with `budget` as the thinking budget. `engine`: a rollout engine that already holds
    the model's weights (GRPO's validation reuses its own and keeps it); otherwise one is built for `model`
    and closed at the end."""
    from engine.data.loader import build_rl_prompt_iterator
    from engine.rl.decoding import build_decoding_plan
    from engine.rl.rewards import RewardSample, build_reward
    from engine.rollout.base import SamplingParams, requests_from_prompts, stop_token_ids
    from engine.rollout.decoding import generate_with_plan
    from engine.rollout.factory import build_rollout_engine

    dp_rank, dp_size = dist.get_rank(pg.dp), dist.get_world_size(pg.dp)
    d = cfg.algorithm.decoding
    own_engine = engine is None
    results = {}
    reward = build_reward("rule")
    for mode in modes:
        mcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, thinking="no_think" if mode == "nothink" else "think",
                                                                 shuffle=False))
        prompts = build_rl_prompt_iterator(mcfg, 1, dp_rank, dp_size)
        tok = prompts.ctx.tokenizer
        if engine is None:
            engine = build_rollout_engine(cfg, model, pg, tokenizer=tok.hf, tokenizer_dir=cfg.data.tokenizer_path)
        plan = build_decoding_plan(mode, tok.hf, banned_words=d.banned_words, ban_bias=d.ban_bias, thinking_budget=budget,
                                   answer_prefix=d.answer_prefix if mode == "budget" else "",
                                   ban_multi_token=d.ban_multi_token)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=k, stop_token_ids=stop_token_ids(tok.hf),
                                seed=1234 + dp_rank)
        n_prompts = prompts.plans.sampler.shard_size if limit is None else min(limit, prompts.plans.sampler.shard_size)
        correct = lengths = count = 0.0
        for _ in range(n_prompts):
            batch = next(prompts)
            (result,) = generate_with_plan(engine, requests_from_prompts(batch), params, plan)
            responses = [c.token_ids for c in result.completions]
            texts = [tok.hf.decode(ids, skip_special_tokens=True) for ids in responses]
            scores = reward([RewardSample("", t, batch["answers"][0]) for t in texts]).total
            correct += float(scores.sum())
            lengths += float(sum(len(r) for r in responses))
            count += len(responses)
        c, l_, n = global_sum([correct, lengths, count], group=pg.dp)  # on the backend's device (NCCL: the GPU)
        results[mode] = {"pass@1": c / n if n else math.nan, "mean_length": l_ / n if n else math.nan,
                         "samples": int(n), "k": k}
    if own_engine and engine is not None:
        engine.close()
    return results
