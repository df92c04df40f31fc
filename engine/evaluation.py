"""Benchmark evaluation: pass@1 averaged over k samples, per decoding mode (think / nothink / nowait /
budget), with accuracy from the rule check (extraction + math-verify) and the mean response length.

Prompts come from an RL-format JSONL through the same data path as training; generation goes through
the configured rollout engine. Under torchrun every DP rank evaluates its own shard; results are summed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist


def _budget_generate(engine, requests, params, budget_ids, budget: int, answer_tokens: int):
    """Thinking budget: think for at most `budget` tokens; where the model has not closed its thinking,
    force '</think>' (+ answer prefix) and let it answer in up to `answer_tokens` more tokens."""
    from engine.rollout.base import GenerationRequest

    think_end = budget_ids[0]
    first = engine.generate(requests, dataclasses.replace(params, max_tokens=budget,
                                                          stop_token_ids=list(params.stop_token_ids) + [think_end[-1]]))
    out = []
    for req, res in zip(requests, first):
        comps = []
        for comp in res.completions:
            ids = list(comp.token_ids)
            if ids and ids[-1] in params.stop_token_ids:
                comps.append(ids)
                continue
            if ids[-len(think_end):] != list(think_end):
                ids += list(think_end)
            ids += list(budget_ids[1])
            cont = engine.generate([GenerationRequest(req.prompt_token_ids + ids, images=req.images)],
                                   dataclasses.replace(params, n=1, max_tokens=answer_tokens))
            comps.append(ids + list(cont[0].completions[0].token_ids))
        out.append(comps)
    return out


def evaluate(cfg, model, pg, modes: list[str], k: int, temperature: float, max_tokens: int,
             budget: int | None = None, limit: int | None = None, engine=None) -> dict:
    """Prompts from cfg.data.train_path. `engine`: a rollout engine that already holds the model's weights
    (GRPO's validation reuses its own); by default one is built for `model`."""
    from engine.data.loader import build_rl_prompt_iterator
    from engine.rl.decoding import build_decoding_plan
    from engine.rl.rewards import RewardSample, build_reward
    from engine.rollout.base import GenerationRequest, SamplingParams
    from engine.rollout.factory import build_rollout_engine

    dp_rank, dp_size = dist.get_rank(pg.dp), dist.get_world_size(pg.dp)
    results = {}
    reward = build_reward("rule")
    for mode in modes:
        mcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, thinking="no_think" if mode == "nothink" else "think",
                                                                 shuffle=False))
        prompts = build_rl_prompt_iterator(mcfg, 1, dp_rank, dp_size)
        tok = prompts.ctx.tokenizer
        if engine is None:
            engine = build_rollout_engine(cfg, model, pg, tokenizer=tok.hf, tokenizer_dir=cfg.data.tokenizer_path)
        plan = build_decoding_plan(mode, tok.hf, thinking_budget=budget, ban_multi_token="auto")
        stop = sorted({tok.hf.convert_tokens_to_ids("<|im_end|>"), tok.hf.eos_token_id} - {None})
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=k, stop_token_ids=stop,
                                logit_bias=dict(plan.logit_bias), seed=1234 + dp_rank)
        n_prompts = prompts.plans.sampler.shard_size if limit is None else min(limit, prompts.plans.sampler.shard_size)
        correct = lengths = count = 0.0
        for _ in range(n_prompts):
            batch = next(prompts)
            if cfg.rollout.backend == "vllm":  # vLLM tiles PIL images itself
                from PIL import Image

                images = [Image.open(p).convert("RGB") for p in batch["image_paths"][0]] or None
            else:
                images = batch["pixel_values"] if batch["pixel_values"].shape[0] else None
            req = GenerationRequest(batch["prompt_ids"][0], images=images, request_id=batch["sample_ids"][0][0])
            if mode == "budget":
                b = plan.budget
                responses = _budget_generate(engine, [req], params, (b.think_end_ids, b.answer_prefix_ids), b.budget,
                                             max_tokens)[0]
            else:
                responses = [c.token_ids for c in engine.generate([req], params)[0].completions]
            texts = [tok.hf.decode(ids, skip_special_tokens=True) for ids in responses]
            scores = reward([RewardSample("", t, batch["answers"][0]) for t in texts]).total
            correct += float(scores.sum())
            lengths += float(sum(len(r) for r in responses))
            count += len(responses)
        totals = torch.tensor([correct, lengths, count], dtype=torch.float64)
        dist.all_reduce(totals, group=pg.dp)
        c, l_, n = totals.tolist()
        results[mode] = {"pass@1": c / n if n else math.nan, "mean_length": l_ / n if n else math.nan,
                         "samples": int(n), "k": k}
    return results
