"""One GRPO episode's samples on this data-parallel rank: `collect_episode(engine, prompts, reward_fn, cfg)`.

It owns everything between the policy's weights being in the rollout engine and the rows to train on:
  1. rollout: this rank's prompts through the engine with the decoding plan (algorithm.decoding: nowait
     bans, thinking budget), G samples each, image tokens banned (and cut, where a backend's ban is finite);
  2. rewards (algorithm.reward) and the overlong policy (algorithm.grpo.overlong);
  3. the SSB offline prompt filter records every group (before dynamic sampling), `PromptSource` skips
     exhausted prompts when drawing the next ones;
  4. dynamic sampling (engine/rl/dynamic_sampling.py): keep informative groups, roll out more prompts,
     top up with zero-advantage groups after max_rounds; every rank runs the same number of rounds;
  5. group advantages, then the Selective Sample Buffer refills zero-advantage slots.
Nothing here touches the model or the optimizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.rollout.base import GenerationResult, RolloutEngine, SamplingParams, image_token_ids, requests_from_prompts, stop_token_ids


@dataclass
class Rollout:
    """One sample: the training row it becomes and what the metrics need."""

    sample_id: str
    group: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the engine's raw log-probs, one per response token (0.0 at forced tokens)
    tiles: torch.Tensor  # (n_tiles, 3, H, W)
    response_text: str
    prompt_text: str
    gold: str
    prompt_id: str = ""
    finished: bool = True  # ended with a stop token (not cut at max_response_length / an image token)
    in_loss: bool = True  # False: DAPO overlong filtering keeps it out of the loss
    sampled: list[bool] | None = None  # per response token: sampled by the policy (None: all); forced ones never learn

    def learned(self) -> list[bool]:
        """Per response token: does it enter the policy loss."""
        sampled = self.sampled if self.sampled is not None else [True] * len(self.response_ids)
        return [self.in_loss and s for s in sampled]


@dataclass
class Episode:
    samples: list[Rollout]                 # fresh samples kept, G per prompt, each group contiguous
    rewards: torch.Tensor                  # [N]
    components: dict[str, torch.Tensor]    # reward components [N] each
    advantages: torch.Tensor               # [N]
    train_rows: list[Rollout]              # what the update trains on: fresh samples + buffered ones
    train_advantages: torch.Tensor         # [len(train_rows)]
    stats: dict = field(default_factory=dict)  # rounds, dropped / topped-up groups, truncation, first-round reward
    reward_counter: dict[str, int] = field(default_factory=dict)


class PromptSource:
    """The next `per_rank` prompts of this rank; with the SSB offline filter, exhausted prompts are skipped
    (counted in `filtered`) and surplus ones wait in `pending` for the next call."""

    def __init__(self, data, per_rank: int, prompt_filter=None, pad_id: int = 0):
        self.data, self.per_rank, self.filter, self.pad_id = data, per_rank, prompt_filter, pad_id
        self.pending: list[tuple[dict, int]] = []  # (batch, row) past the filter, beyond this episode's need
        self.filtered = 0

    def next(self) -> dict:
        if self.filter is None:
            return next(self.data)
        from engine.data.batch import select_rl_rows

        shard = self.data.plans.sampler.shard_size
        scanned = 0
        while len(self.pending) < self.per_rank:
            if scanned > 2 * shard:
                raise RuntimeError(
                    f"algorithm.ssb.offline_filter: every prompt of this rank's {shard} had zero-advantage groups in its "
                    f"last {self.filter.window} rollouts (all right or all wrong): nothing left to learn from "
                    "data.train_path. Stop here, add prompts, or raise algorithm.ssb.offline_window.")
            batch = next(self.data)
            ids = [sid[0] for sid in batch["sample_ids"]]
            kept, dropped = self.filter.filter(ids)
            scanned += len(ids)
            self.filtered += len(dropped)
            kept = set(kept)
            self.pending += [(batch, row) for row, pid in enumerate(ids) if pid in kept]
        take, self.pending = self.pending[: self.per_rank], self.pending[self.per_rank:]
        return select_rl_rows([b for b, _ in take], [(k, row) for k, (_, row) in enumerate(take)], self.pad_id)

    def state_dict(self) -> dict:
        """The filter's history (the pending few are not kept: they come back next epoch)."""
        return {"prompt_filter": self.filter.state_dict() if self.filter is not None else None,
                "prompts_filtered": self.filtered}

    def load_state_dict(self, state: dict) -> None:
        if self.filter is not None and state.get("prompt_filter"):
            self.filter.load_state_dict(state["prompt_filter"])
            self.filtered = state.get("prompts_filtered", 0)


def sampling_params(cfg, tokenizer, seed: int) -> SamplingParams:
    """GRPO's rollout sampling: algorithm.grpo's temperature / top_p / length / G; a response never emits
    an image placeholder token."""
    g = cfg.algorithm.grpo
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_response_length, n=g.group_size,
                          stop_token_ids=stop_token_ids(tokenizer),
                          logit_bias={i: float("-inf") for i in image_token_ids(tokenizer)}, seed=seed)


def rollouts_from_results(batch: dict, results: list[GenerationResult], tokenizer, step: int,
                          counts: dict[str, int]) -> list[Rollout]:
    """Engine results -> Rollouts, G per prompt in order. A response is cut before an image token (vLLM's
    bans are finite, -100); counted in counts['truncated_at_image_token']."""
    forbidden = image_token_ids(tokenizer)
    tiles_per = batch["tiles_per_row"].tolist()
    offsets = [0] + torch.cumsum(torch.tensor(tiles_per), 0).tolist()
    out = []
    for i, res in enumerate(results):
        prompt_id = batch["sample_ids"][i][0]
        prompt_text = tokenizer.decode(batch["prompt_ids"][i], skip_special_tokens=False)
        for j, comp in enumerate(res.completions):
            ids, lps, sampled = list(comp.token_ids), list(comp.logprobs), comp.sampled()
            cut = next((k for k, t in enumerate(ids) if t in forbidden), None)
            if cut is not None:
                counts["truncated_at_image_token"] = counts.get("truncated_at_image_token", 0) + 1
                ids, lps, sampled = ids[:cut], lps[:cut], sampled[:cut]
            out.append(Rollout(
                sample_id=f"{prompt_id}#{step}.{j}", group=i, prompt_ids=list(batch["prompt_ids"][i]),
                response_ids=ids, rollout_logprobs=lps, tiles=batch["pixel_values"][offsets[i]: offsets[i + 1]],
                response_text=tokenizer.decode(ids, skip_special_tokens=True), prompt_text=prompt_text,
                gold=batch["answers"][i], prompt_id=prompt_id, finished=cut is None and comp.finish_reason == "stop",
                sampled=None if all(sampled) else sampled,
            ))
    return out


def collect_episode(engine: RolloutEngine, prompts: PromptSource, reward_fn, cfg, *, step: int, seed: int,
                    buffer=None, any_rank_short: Callable[[bool], bool] = lambda short: short) -> Episode:
    """This rank's samples of one episode (see the module docstring). `cfg`: the root Config. `seed`: the
    rollout's sampling seed. `buffer`: the SelectiveSampleBuffer (None: off). `any_rank_short(short)`: True
    when any data-parallel rank still lacks samples (a collective: generation may be collective too)."""
    from engine.rl.advantages import compute_advantages
    from engine.rl.decoding import decoding_plan_from_config
    from engine.rl.dynamic_sampling import select_round
    from engine.rl.overlong import apply_overlong_reward, overlong_loss_keep
    from engine.rl.rewards import RewardSample
    from engine.rollout.decoding import generate_with_plan

    g, tokenizer = cfg.algorithm.grpo, engine.tokenizer
    plan = decoding_plan_from_config(cfg.algorithm.decoding, tokenizer)
    params = sampling_params(cfg, tokenizer, seed)
    need = prompts.per_rank * g.group_size
    samples: list[Rollout] = []
    rewards, components, counter = [], {}, {}
    stats = {"rollout_rounds": 0, "dropped_groups": 0, "topped_up_groups": 0, "generated": 0, "truncated": 0}
    t0 = time.perf_counter()
    while True:
        stats["rollout_rounds"] += 1
        batch = prompts.next()
        results = generate_with_plan(engine, requests_from_prompts(batch), params, plan)
        fresh = rollouts_from_results(batch, results, tokenizer, step, stats)
        res = reward_fn([RewardSample(s.prompt_text, s.response_text, s.gold, s.sample_id) for s in fresh])
        finished = torch.tensor([s.finished for s in fresh])
        stats["generated"] += len(fresh)
        stats["truncated"] += int((~finished).sum())
        res.total, res.components = apply_overlong_reward(g.overlong, res.total, res.components, finished)
        for s, keep_in_loss in zip(fresh, overlong_loss_keep(g.overlong, finished).tolist()):
            s.in_loss = keep_in_loss
        if stats["rollout_rounds"] == 1:  # the policy's reward on fresh prompts, before dynamic sampling filters
            stats["reward_mean_all"] = float(res.total.mean())
            stats["accuracy_all"] = float(res.components["accuracy"].mean()) if "accuracy" in res.components else None
        for k, v in res.counter.items():
            counter[k] = counter.get(k, 0) + v
        if prompts.filter is not None:
            group_adv = compute_advantages(g.advantage, res.total, g.group_size, g.advantage_eps).view(-1, g.group_size)
            for grp, adv in enumerate(group_adv):
                prompts.filter.record(fresh[grp * g.group_size].prompt_id, adv)
        keep = torch.ones(len(fresh), dtype=torch.bool)
        last_round = not g.dynamic_sampling or stats["rollout_rounds"] >= g.dynamic_sampling_max_rounds
        if g.dynamic_sampling:
            sel = select_round(res.total, g.group_size, need - len(samples), last_round)
            keep, stats["dropped_groups"] = sel.keep, stats["dropped_groups"] + sel.dropped
            stats["topped_up_groups"] += sel.topped_up
        samples += [s for s, k in zip(fresh, keep.tolist()) if k]
        rewards.append(res.total[keep])
        for k, v in res.components.items():
            components.setdefault(k, []).append(v[keep])
        if last_round or not any_rank_short(len(samples) < need):
            break
    stats["rollout_time_s"] = time.perf_counter() - t0
    rewards_t = torch.cat(rewards)[:need]
    samples = samples[: len(rewards_t)]
    comps = {k: torch.cat(v)[: len(rewards_t)] for k, v in components.items()}
    advantages = compute_advantages(g.advantage, rewards_t, g.group_size, g.advantage_eps) if len(rewards_t) else rewards_t
    train_rows, train_adv = list(samples), advantages.clone()
    if buffer is not None and samples:  # Selective Sample Buffer: refill zero-advantage slots with buffered samples
        buffer.expire(step)
        mix = buffer.mix(advantages, step, cfg.algorithm.ssb.max_mix_fraction)
        stats["ratio_with_buffer"] = mix.ratio_with_buffer
        train_rows = [samples[i] for i in mix.keep_fresh.tolist()] + [b.payload for b in mix.buffered]
        train_adv = torch.cat([advantages[mix.keep_fresh],
                               torch.tensor([b.advantage for b in mix.buffered], dtype=advantages.dtype)])
        buffer.add([s.sample_id for s in samples], advantages, step, payloads=samples)
    return Episode(samples, rewards_t, comps, advantages, train_rows, train_adv, stats, counter)
