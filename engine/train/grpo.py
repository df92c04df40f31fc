"""GRPO with a colocated rollout engine (R1V / R1V2 / R1V3).

One `train.step` is one episode, on every DP rank for its own prompts:
  1. push the policy's weights into the rollout engine (streamed from the TP shards), wake it;
  2. generate G samples per prompt; put the engine to sleep;
  3. rewards (algorithm.reward), group advantages; dynamic sampling drops groups with equal rewards
     and refills from new prompts; the Selective Sample Buffer refills zero-advantage slots;
  4. old log-probs recomputed by the trainer (not trusted from the engine; the mismatch is logged),
     reference log-probs when kl_coef > 0;
  5. `gradient_steps_per_episode` optimizer steps over mini-batches with the fused clipped loss.
The math lives in engine/rl (pure tensors) and kernels/ (the fused loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from engine.train.losses import mask_padded_vocab, token_logprobs
from engine.train.step import forward_backward
from engine.train.trainer import Trainer


@dataclass
class Rollout:
    """One sample: the training row it becomes and what the metrics need."""

    sample_id: str
    group: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    tiles: torch.Tensor  # (n_tiles, 3, H, W)
    response_text: str
    prompt_text: str
    gold: str
    prompt_id: str = ""
    finished: bool = True  # ended with a stop token (not cut at max_response_length / an image token)
    in_loss: bool = True


def _token_logprobs_loss(batch, tp_group, vocab_size, temperature, logits):
    """Forward-only: per-token log-probs and entropy of the labels (old / reference policy)."""
    lp, ent = token_logprobs(logits, batch["labels"], tp_group, "fused", temperature, vocab_size)
    return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logprobs": lp, "entropy": ent}


def _grpo_micro_loss(batch, tp_group, vocab_size, g, impl, logits):
    """Clipped GRPO loss of one micro-batch in megatron's (sum, count, report) contract."""
    import kernels

    b, s, _ = logits.shape
    flat = mask_padded_vocab(logits, vocab_size, tp_group)
    mask = batch["loss_mask"].float()
    args = (flat, batch["labels"].reshape(-1), batch["old_logprobs"].reshape(-1), batch["advantages"].reshape(-1),
            mask.reshape(-1), None if batch.get("ref_logprobs") is None else batch["ref_logprobs"].reshape(-1))
    kw = dict(clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, dual_clip_c=g.dual_clip_c,
              kl_coef=g.kl_coef, kl_type=g.kl_estimator, temperature=g.temperature)
    if impl == "fused":
        per_token, stats = kernels.fused_grpo_loss(*args, **kw, tp_group=tp_group)
    else:
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            raise ValueError("train.loss_impl=reference for GRPO runs at TP=1 only; use loss_impl=fused")
        per_token, stats = kernels.grpo_loss_reference(*args, **kw)
    per_token = per_token.view(b, s)
    tokens_per_row = mask.sum(1)
    rows = (tokens_per_row > 0).float()
    if g.loss_agg_mode == "token-mean":
        loss_sum, count = per_token.sum(), mask.sum()
    elif g.loss_agg_mode == "seq-mean-token-mean":
        loss_sum, count = (per_token.sum(1) / tokens_per_row.clamp(min=1) * rows).sum(), rows.sum()
    else:  # seq-mean-token-sum
        loss_sum, count = (per_token.sum(1) * rows).sum(), rows.sum()
    flat_mask = mask.reshape(-1)
    report = {
        "loss_sum": loss_sum.detach(), "count": count.detach(), "tokens": flat_mask.sum(),
        "clip_low_sum": (stats["clipped_low"].float() * flat_mask).sum(),
        "clip_high_sum": (stats["clipped_high"].float() * flat_mask).sum(),
        "dual_clip_sum": (stats["dual_clipped"].float() * flat_mask).sum(),
        "kl_sum": (stats["kl"] * flat_mask).sum(), "ratio_sum": (stats["ratio"] * flat_mask).sum(),
    }
    return loss_sum, count.to(torch.int), report


class GRPOTrainer(Trainer):
    # ------------------------------------------------------------------ set-up
    def build_data(self, state):
        from engine.data.loader import build_rl_prompt_iterator

        g = self.cfg.algorithm.grpo
        if g.prompts_per_episode % self.dp_size:
            raise ValueError(f"algorithm.grpo: {g.prompts_per_episode} prompts per episode do not split over "
                             f"{self.dp_size} data-parallel ranks")
        self.prompts_per_rank = g.prompts_per_episode // self.dp_size
        return build_rl_prompt_iterator(self.cfg, self.prompts_per_rank, self.dp_rank, self.dp_size, state=state)

    def setup_stage(self, resuming: bool) -> None:
        from engine.rl.rewards import build_reward_from_config
        from engine.rl.sample_buffer import PromptPoolFilter, SelectiveSampleBuffer

        c = self.cfg
        if c.parallel.pipeline_model_parallel_size != 1:
            raise NotImplementedError("GRPO runs with parallel.pipeline_model_parallel_size=1 for now (the rollout "
                                      "weight push and the native engine need the whole LLM on one stage)")
        if c.data.format != "rl":
            raise ValueError(f"train.stage=grpo needs data.format=rl (got {c.data.format})")
        self.engine = None  # built at the first episode, when the tokenizer is known
        self.truncated_at_image_token = 0
        self.reward_fn = build_reward_from_config(c.algorithm.reward, generate=self._judge_generate)
        self.buffer = None
        if c.algorithm.ssb.enabled:
            s = c.algorithm.ssb
            self.buffer = SelectiveSampleBuffer(s.capacity, s.max_age, s.seed, s.min_abs_advantage)
        # SSB offline mode: prompts whose last groups had no signal are not rolled out again
        self.prompt_filter = PromptPoolFilter(c.algorithm.ssb.offline_window) if c.algorithm.ssb.offline_filter else None
        self.pending_prompts: list[tuple[dict, int]] = []  # (batch, row) past the filter, beyond this episode's need
        self.prompts_filtered = 0
        self.reference = None
        if c.algorithm.grpo.kl_coef > 0:
            self.reference = self.frozen_reference(resuming, "KL reference policy")

    def _build_engine(self):
        from engine.rollout.factory import build_rollout_engine

        c = self.cfg
        self.tokenizer = self.data.ctx.tokenizer.hf
        return build_rollout_engine(c, self.model, self.pg, tokenizer=self.tokenizer,
                                    tokenizer_dir=self.data.ctx.tokenizer.path)

    def _judge_generate(self, prompts: list[str]) -> list[str]:
        """Model-verifier rewards run their judge prompts through the rollout engine (greedy)."""
        from engine.rollout.base import GenerationRequest, SamplingParams

        reqs = [GenerationRequest(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        outs = self.engine.generate(reqs, SamplingParams(temperature=0.0, max_tokens=64,
                                                         stop_token_ids=self._stop_ids()))
        return [self.tokenizer.decode(o.completions[0].token_ids, skip_special_tokens=True) for o in outs]

    def _stop_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        return sorted(i for i in ids if i is not None and i >= 0)

    def _image_token_ids(self) -> set[int]:
        vocab = self.tokenizer.get_vocab()
        return {vocab[t] for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<video>") if t in vocab}

    # ------------------------------------------------------------------ rollout
    def _sampling_params(self):
        from engine.rl.decoding import decoding_plan_from_config
        from engine.rollout.base import SamplingParams

        c, g = self.cfg, self.cfg.algorithm.grpo
        plan = decoding_plan_from_config(c.algorithm.decoding, self.tokenizer)
        bias = dict(plan.logit_bias or {})
        bias.update({i: float("-inf") for i in self._image_token_ids()})  # a response never emits image slots
        return SamplingParams(
            temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_response_length, n=g.group_size,
            stop_token_ids=self._stop_ids(), logit_bias=bias,
            seed=c.rollout.seed + 1000 * self.step + self.dp_rank,
        )

    def _rollout(self, batch: dict) -> list[Rollout]:
        from PIL import Image

        from engine.rollout.base import GenerationRequest

        tiles_per = batch["tiles_per_row"].tolist()
        offsets = [0] + list(torch.cumsum(torch.tensor(tiles_per), 0).tolist())
        requests = []
        for i, ids in enumerate(batch["prompt_ids"]):
            tiles = batch["pixel_values"][offsets[i]: offsets[i + 1]]
            if self.cfg.rollout.backend == "vllm":
                images = [Image.open(p).convert("RGB") for p in batch["image_paths"][i]] or None
            else:
                images = tiles if tiles.shape[0] else None
            requests.append(GenerationRequest(list(ids), images=images, request_id=batch["sample_ids"][i][0]))
        results = self.engine.generate(requests, self._sampling_params())
        forbidden = self._image_token_ids()
        out = []
        for i, res in enumerate(results):
            prompt_text = self.tokenizer.decode(batch["prompt_ids"][i], skip_special_tokens=False)
            for j, comp in enumerate(res.completions):
                cut = next((k for k, t in enumerate(comp.token_ids) if t in forbidden), None)
                if cut is not None:  # bias limits are finite in vLLM: cut a response at an image token
                    self.truncated_at_image_token += 1
                    comp.token_ids, comp.logprobs = comp.token_ids[:cut], comp.logprobs[:cut]
                finished = cut is None and comp.finish_reason == "stop"
                out.append(Rollout(
                    sample_id=f"{batch['sample_ids'][i][0]}#{self.step}.{j}", group=i,
                    prompt_ids=list(batch["prompt_ids"][i]), response_ids=list(comp.token_ids),
                    rollout_logprobs=list(comp.logprobs), tiles=batch["pixel_values"][offsets[i]: offsets[i + 1]],
                    response_text=self.tokenizer.decode(comp.token_ids, skip_special_tokens=True),
                    prompt_text=prompt_text, gold=batch["answers"][i], prompt_id=batch["sample_ids"][i][0],
                    finished=finished,
                ))
        return out

    # ------------------------------------------------------------------ training rows
    def _rows_to_microbatches(self, rows: list[Rollout], advantages: torch.Tensor) -> list[dict]:
        c = self.cfg
        S, mbs = c.train.seq_length, c.train.micro_batch_size
        pad = self.data.ctx.tokenizer.pad_id
        micro = []
        for start in range(0, len(rows), mbs):
            chunk = rows[start: start + mbs]
            n = len(chunk)
            tokens = torch.full((mbs, S), pad, dtype=torch.long)
            labels = torch.full((mbs, S), pad, dtype=torch.long)
            mask = torch.zeros(mbs, S)
            adv = torch.zeros(mbs, S)
            rollout_lp = torch.zeros(mbs, S)
            tiles, tiles_per_row, ids = [], torch.zeros(mbs, dtype=torch.long), []
            for r, row in enumerate(chunk):
                seq = (row.prompt_ids + row.response_ids)[:S]
                p = len(row.prompt_ids)
                tokens[r, : len(seq)] = torch.tensor(seq)
                labels[r, : len(seq) - 1] = torch.tensor(seq[1:])
                lo, hi = p - 1, len(seq) - 1  # label positions that predict response tokens
                if hi > lo and row.in_loss:
                    mask[r, lo:hi] = 1.0
                    adv[r, lo:hi] = float(advantages[start + r])
                    rollout_lp[r, lo:hi] = torch.tensor(row.rollout_logprobs[: hi - lo])
                tiles.append(row.tiles)
                tiles_per_row[r] = row.tiles.shape[0]
                ids.append([row.sample_id])
            ids += [[f"pad{k}"] for k in range(mbs - n)]
            side = c.model.vision.image_size
            micro.append(dict(
                tokens=tokens, labels=labels, loss_mask=mask, advantages=adv, rollout_logprobs=rollout_lp,
                position_ids=torch.arange(S).repeat(mbs, 1), segment_ids=torch.ones(mbs, S, dtype=torch.long),
                pixel_values=torch.cat(tiles) if tiles else torch.zeros(0, 3, side, side),
                tiles_per_row=tiles_per_row, sample_ids=ids,
            ))
        return micro

    def _forward_logprobs(self, model, micro: list[dict]) -> list[dict]:
        g = self.cfg.algorithm.grpo
        with torch.no_grad():
            return forward_backward(
                model, micro, self.pg,
                lambda b: partial(_token_logprobs_loss, b, self.pg.tp, self.cfg.model.llm.vocab_size, g.temperature),
                forward_only=True,
            )

    # ------------------------------------------------------------------ one episode
    def train_step(self) -> dict:
        from engine.rl.advantages import compute_advantages
        from engine.rl.dynamic_sampling import informative_groups
        from engine.rl.metrics import logprob_mismatch, reasoning_word_token_ids, rl_step_metrics
        from engine.rl.overlong import apply_overlong_reward, overlong_loss_keep
        from engine.rl.rewards import RewardSample
        from engine.train.optim import lr_at, set_lr

        c, g = self.cfg, self.cfg.algorithm.grpo
        t_start = time.perf_counter()
        if self.engine is None:
            self.engine = self._build_engine()
            self.critical_ids = reasoning_word_token_ids(self.tokenizer, c.algorithm.metrics.reasoning_words)

        # 1-2. rollout (with dynamic-sampling refills)
        self.engine.wake()
        push = self.engine.update_weights(self.model)
        samples, rewards, components, counters, dropped, rounds, truncated, generated = [], [], {}, {}, 0, 0, 0, 0
        need = self.prompts_per_rank * g.group_size
        while True:
            rounds += 1
            fresh = self._rollout(self._next_prompts())
            generated += len(fresh)
            res = self.reward_fn([RewardSample(s.prompt_text, s.response_text, s.gold, s.sample_id) for s in fresh])
            finished = torch.tensor([s.finished for s in fresh])
            truncated += int((~finished).sum())
            res.total, res.components = apply_overlong_reward(g.overlong, res.total, res.components, finished)
            for s, keep_in_loss in zip(fresh, overlong_loss_keep(g.overlong, finished).tolist()):
                s.in_loss = keep_in_loss
            if rounds == 1:  # the policy's reward on fresh prompts, before dynamic sampling filters groups
                first_round = {"reward_mean_all": float(res.total.mean()),
                               "accuracy_all": float(res.components["accuracy"].mean()) if "accuracy" in res.components else None}
            for k, v in res.counter.items():
                counters[k] = counters.get(k, 0) + v
            if self.prompt_filter is not None:
                group_adv = compute_advantages(g.advantage, res.total, g.group_size, g.advantage_eps).view(-1, g.group_size)
                for grp, adv in enumerate(group_adv):
                    self.prompt_filter.record(fresh[grp * g.group_size].prompt_id, adv)
            keep = torch.ones(len(fresh), dtype=torch.bool)
            if g.dynamic_sampling:
                groups_ok = informative_groups(res.total, g.group_size)
                keep = groups_ok.repeat_interleave(g.group_size)
                dropped += int((~groups_ok).sum())
                if rounds >= g.dynamic_sampling_max_rounds:
                    # out of rounds: top up with this round's uninformative groups (advantage 0, no gradient)
                    short = max(0, need - len(samples) - int(keep.sum()))
                    for grp in (~groups_ok).nonzero().flatten().tolist()[: -(-short // g.group_size)]:
                        keep[grp * g.group_size: (grp + 1) * g.group_size] = True
            samples += [s for s, k in zip(fresh, keep) if k]
            rewards.append(res.total[keep])
            for k, v in res.components.items():
                components.setdefault(k, []).append(v[keep])
            if not g.dynamic_sampling or rounds >= g.dynamic_sampling_max_rounds:
                break
            # every rank runs the same number of rounds: generation may be collective (vLLM external_launcher)
            if self._global_sum([float(len(samples) < need)])[0] == 0:
                break
        self.engine.sleep()
        t_rollout = time.perf_counter() - t_start
        rewards_t = torch.cat(rewards)[:need]
        samples = samples[: len(rewards_t)]
        components = {k: torch.cat(v)[: len(rewards_t)] for k, v in components.items()}
        advantages = (compute_advantages(g.advantage, rewards_t, g.group_size, g.advantage_eps)
                      if len(rewards_t) else rewards_t)

        # 3. Selective Sample Buffer: refill zero-advantage slots with buffered samples
        ratio_with_buffer = None
        train_rows, train_adv = list(samples), advantages.clone()
        if self.buffer is not None and len(samples):
            self.buffer.expire(self.step)
            plan = self.buffer.mix(advantages, self.step, c.algorithm.ssb.max_mix_fraction)
            ratio_with_buffer = plan.ratio_with_buffer
            train_rows = [samples[i] for i in plan.keep_fresh.tolist()] + [b.payload for b in plan.buffered]
            train_adv = torch.cat([advantages[plan.keep_fresh],
                                   torch.tensor([b.advantage for b in plan.buffered], dtype=advantages.dtype)])
            self.buffer.add([s.sample_id for s in samples], advantages, self.step, payloads=samples)

        # 4. old (and reference) log-probs from the trainer's own forward
        t_train = time.perf_counter()
        micro = self._rows_to_microbatches(train_rows, train_adv) if train_rows else []
        micro = self._even_microbatches(micro)
        old_reports = self._forward_logprobs(self.ddp, micro)
        ref_reports = self._forward_logprobs(self.reference, micro) if self.reference is not None else None
        for k, mb in enumerate(micro):
            mb["old_logprobs"] = old_reports[k]["logprobs"]
            mb["entropy"] = old_reports[k]["entropy"]
            mb["ref_logprobs"] = ref_reports[k]["logprobs"] if ref_reports else None

        # 5. gradient steps over mini-batches
        lr = lr_at(self.step, c)
        set_lr(self.optimizer, lr)
        steps = max(1, g.gradient_steps_per_episode)
        per_step = max(1, math.ceil(len(micro) / (steps // g.ppo_epochs)))
        sums: dict[str, float] = {}
        grad_norms, skipped = [], False
        for epoch in range(g.ppo_epochs):
            for start in range(0, len(micro), per_step):
                chunk = micro[start: start + per_step]
                self.ddp.zero_grad_buffer()
                self.optimizer.zero_grad()
                reports = forward_backward(self.ddp, chunk, self.pg, lambda b: partial(
                    _grpo_micro_loss, b, self.pg.tp, c.model.llm.vocab_size, g, c.train.loss_impl))
                step_loss, step_count = 0.0, 0.0
                for r in reports:
                    for k, v in r.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    step_loss, step_count = step_loss + float(r["loss_sum"]), step_count + float(r["count"])
                reporter = self._is_loss_reporter()  # one per DP replica (TP ranks hold the same sums)
                step_loss, step_count = self._global_sum([step_loss if reporter else 0.0, step_count if reporter else 0.0])
                stepped, gn = self.optimizer_step(step_loss / max(step_count, 1.0), step_count)
                if stepped:
                    grad_norms.append(gn)
                skipped |= not stepped
        self.step += 1
        t_train = time.perf_counter() - t_train

        # 6. metrics (this rank's samples; then averaged over DP ranks)
        mask = torch.cat([mb["loss_mask"] for mb in micro]) if micro else torch.zeros(0, 1)
        entropy = torch.cat([mb["entropy"] for mb in micro]) if micro else torch.zeros(0, 1)
        labels = torch.cat([mb["labels"] for mb in micro]) if micro else torch.zeros(0, 1, dtype=torch.long)
        m = rl_step_metrics(
            rewards=rewards_t, reward_components=components, advantages=advantages,
            response_lengths=torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float),
            entropy=entropy, token_ids=labels, loss_mask=mask, critical_ids=self.critical_ids,
            entropy_threshold=c.algorithm.metrics.entropy_threshold,
            responses=[s.response_text for s in samples],
            hallucination_phrases=c.algorithm.metrics.hallucination_phrases,
            ratio_with_buffer=ratio_with_buffer, reward_counter=counters,
        )
        if g.temperature == 1.0 and micro:  # engines report raw (T=1) log-probs
            old = torch.cat([mb["old_logprobs"] for mb in micro])
            roll = torch.cat([mb["rollout_logprobs"] for mb in micro])
            m.update(logprob_mismatch(old, roll, mask))
        tok = max(sums.get("tokens", 0.0), 1.0)
        m.update({
            "loss": sums.get("loss_sum", 0.0) / max(sums.get("count", 0.0), 1.0),
            "clip_frac_low": sums.get("clip_low_sum", 0.0) / tok, "clip_frac_high": sums.get("clip_high_sum", 0.0) / tok,
            "dual_clip_frac": sums.get("dual_clip_sum", 0.0) / tok, "kl": sums.get("kl_sum", 0.0) / tok,
            "ratio_mean": sums.get("ratio_sum", 0.0) / tok,
        })
        m.update(first_round)
        m["truncated_ratio"] = truncated / max(generated, 1)  # share of generated responses cut at the limit
        self._dump_rollouts(samples, rewards_t, advantages)
        record = self._average_over_dp(m)
        record.update({
            "step": self.step, "lr": lr, "grad_norm": grad_norms[-1] if grad_norms else float("nan"),
            "skipped": skipped, "skipped_steps": self.skipped_steps, "empty_steps": self.empty_steps,
            "dropped_groups": dropped, "rollout_rounds": rounds,
            "rollout_time_s": t_rollout, "train_time_s": t_train, "step_time_s": time.perf_counter() - t_start,
            "weight_push_s": float(push.get("seconds", push.get("push_s", float("nan")))) if isinstance(push, dict) else None,
            "samples": len(samples) * self.dp_size, "truncated_at_image_token": self.truncated_at_image_token,
            "data_skipped": self.data_skipped(),  # collective: every DP rank's skips, kept across resumes
        })
        if self.prompt_filter is not None:  # summed over DP ranks: prompts skipped so far, exhausted now
            skipped_total, exhausted = self._global_sum([
                float(self.prompts_filtered), float(sum(self.prompt_filter.is_exhausted(p) for p in self.prompt_filter.history))])
            record.update({"prompts_filtered_total": skipped_total, "prompts_exhausted": exhausted})
        return record

    def _next_prompts(self) -> dict:
        """The next `prompts_per_rank` prompts; with the SSB offline filter, exhausted ones are skipped
        (counted in prompts_filtered_total) and surplus ones wait in `pending_prompts` for the next call."""
        if self.prompt_filter is None:
            return next(self.data)
        from engine.data.batch import select_rl_rows

        pad = self.data.ctx.tokenizer.pad_id
        shard = self.data.plans.sampler.shard_size
        scanned = 0
        while len(self.pending_prompts) < self.prompts_per_rank:
            if scanned > 2 * shard:
                raise RuntimeError(
                    f"algorithm.ssb.offline_filter: every prompt of this rank's {shard} had zero-advantage groups in its "
                    f"last {self.prompt_filter.window} rollouts (all right or all wrong): nothing left to learn from "
                    "data.train_path. Stop here, add prompts, or raise algorithm.ssb.offline_window.")
            batch = next(self.data)
            ids = [sid[0] for sid in batch["sample_ids"]]
            kept, dropped = self.prompt_filter.filter(ids)
            scanned += len(ids)
            self.prompts_filtered += len(dropped)
            kept = set(kept)
            self.pending_prompts += [(batch, row) for row, pid in enumerate(ids) if pid in kept]
        take = self.pending_prompts[: self.prompts_per_rank]
        self.pending_prompts = self.pending_prompts[self.prompts_per_rank:]
        return select_rl_rows([b for b, _ in take], [(k, row) for k, (_, row) in enumerate(take)], pad)

    def _dump_rollouts(self, samples: list[Rollout], rewards: torch.Tensor, advantages: torch.Tensor, k: int = 4) -> None:
        """Rank 0 appends its first k samples of the episode to <run_dir>/rollouts.jsonl (to read, not parse)."""
        if self.rank != 0:
            return
        import json

        with (Path(self.cfg.train.run_dir) / "rollouts.jsonl").open("a") as f:
            for s, r, a in list(zip(samples, rewards.tolist(), advantages.tolist()))[:k]:
                f.write(json.dumps({"step": self.step, "id": s.sample_id, "gold": s.gold, "reward": r,
                                    "advantage": a, "response": s.response_text}) + "\n")

    def _even_microbatches(self, micro: list[dict]) -> list[dict]:
        """Every DP rank must run the same number of micro-batches (gradient all-reduce, schedule)."""
        counts = [None] * dist.get_world_size(self.pg.dp)
        dist.all_gather_object(counts, len(micro), group=self.pg.dp)
        target = max(counts)
        if target == 0:
            raise RuntimeError("no training rows on any rank this episode (empty rollouts); check the prompts")
        while len(micro) < target:  # an all-masked copy contributes no loss and no gradient
            pad = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in micro[-1].items()} if micro else None
            if pad is None:
                raise RuntimeError("this rank has no rollouts this episode while others do")
            pad["loss_mask"] = torch.zeros_like(pad["loss_mask"])
            micro.append(pad)
        return micro

    def _average_over_dp(self, metrics: dict) -> dict:
        """Mean of each numeric metric over the DP ranks that report it (a rank may lack a key or have None)."""
        local = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        gathered = [None] * dist.get_world_size(self.pg.dp)
        dist.all_gather_object(gathered, local, group=self.pg.dp)
        out = dict(metrics)
        for key in sorted({k for d in gathered for k in d}):
            vals = [d[key] for d in gathered if key in d]
            out[key] = sum(vals) / len(vals)
        return out

    # ------------------------------------------------------------------ validation / checkpoint selection
    validation_metric = ("val_accuracy", True)

    def evaluate(self) -> dict[str, float]:
        """pass@1 of the current policy on the first `train.eval_batches` episodes' worth of prompts of
        data.valid_path: greedy, one sample, the configured decoding mode, through the rollout engine."""
        import dataclasses

        from engine.evaluation import evaluate

        c, g, dec = self.cfg, self.cfg.algorithm.grpo, self.cfg.algorithm.decoding
        valid = dataclasses.replace(c, data=dataclasses.replace(c.data, train_path=c.data.valid_path, max_samples=0))
        if self.engine is None:
            self.engine = self._build_engine()
        self.engine.wake()
        self.engine.update_weights(self.model)
        res = evaluate(valid, self.model, self.pg, [dec.mode], k=1, temperature=0.0, max_tokens=g.max_response_length,
                       budget=dec.thinking_budget, limit=c.train.eval_batches * self.prompts_per_rank,
                       engine=self.engine)[dec.mode]
        self.engine.sleep()
        return {"val_accuracy": res["pass@1"], "val_response_length": res["mean_length"]}

    def selection_metric(self) -> tuple[str, bool] | None:
        """R1V3 picks checkpoints by critical-token entropy (higher: more exploration at reasoning words)."""
        return self.cfg.algorithm.metrics.select_checkpoint_by, True

    def extra_state(self) -> dict:
        return {"ssb": self.buffer.state_dict() if self.buffer is not None else None,
                "prompt_filter": self.prompt_filter.state_dict() if self.prompt_filter is not None else None,
                "prompts_filtered": self.prompts_filtered}

    def load_extra_state(self, state: dict) -> None:
        if self.buffer is not None and state.get("ssb"):
            self.buffer.load_state_dict(state["ssb"])
        if self.prompt_filter is not None and state.get("prompt_filter"):
            self.prompt_filter.load_state_dict(state["prompt_filter"])
            self.prompts_filtered = state.get("prompts_filtered", 0)


def run(cfg, resume: str | None = None) -> int:
    trainer = GRPOTrainer(cfg, resume=resume)
    code = trainer.fit()
    if trainer.engine is not None and trainer.cfg.rollout.backend == "vllm":
        from engine.rollout.vllm_engine import release_distributed

        release_distributed()
    from engine.parallel.init import shutdown

    shutdown()
    return code
