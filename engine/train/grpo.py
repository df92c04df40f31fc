"""GRPO with a colocated rollout engine (R1V / R1V2 / R1V3).

One `train.step` is one episode, on every DP rank for its own prompts:
  1. collect (engine/train/grpo_episode.py): push the policy's weights into the rollout engine, generate
     G samples per prompt with the decoding plan, rewards, overlong policy, dynamic sampling, prompt filter,
     advantages, Selective Sample Buffer;
  2. pack (engine/train/grpo_batch.py): the rows to train on, split into `gradient_steps_per_episode /
     ppo_epochs` mini-batches, each packed to train.seq_length and cut into micro-batches;
  3. old log-probs recomputed by the trainer (not trusted from the engine; the mismatch is logged),
     reference log-probs when kl_coef > 0;
  4. optimizer steps over the mini-batches (x ppo_epochs) with the GRPO loss (engine/train/grpo_loss.py),
     each through the trainer's one optimizer-step path (non-finite losses/gradients skipped and counted);
  5. metrics, averaged over DP ranks.
The math lives in engine/rl (pure tensors) and kernels/ (the loss and its aggregation).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from engine.train.grpo_batch import even_over_ranks, pack_rollouts, row_fill, split_for_steps
from engine.train.grpo_episode import Episode, PromptSource, collect_episode
from engine.train.grpo_loss import grpo_loss, token_logprobs_loss
from engine.train.losses import output_weight
from engine.train.optim import lr_at, set_lr
from engine.train.step import forward_backward
from engine.train.trainer import Trainer


class GRPOTrainer(Trainer):
    # ------------------------------------------------------------------ set-up
    def microbatches_per_step(self) -> int | None:
        return None  # rollouts are packed per episode: the count follows them, not train.global_batch_size

    def batch_line(self) -> str:
        g, t = self.cfg.algorithm.grpo, self.cfg.train
        return (f"episode {g.rollouts_per_episode} rollouts ({g.prompts_per_episode} prompts x G {g.group_size}), "
                f"{g.gradient_steps_per_episode} optimizer steps of {t.global_batch_size} samples, packed into rows of "
                f"seq {t.seq_length}, {t.micro_batch_size} rows per micro-batch, DP {self.dp_size}")

    def build_data(self, state):
        from engine.data.loader import build_rl_prompt_iterator

        g = self.cfg.algorithm.grpo
        if g.prompts_per_episode % self.dp_size:
            raise ValueError(f"algorithm.grpo: {g.prompts_per_episode} prompts per episode do not split over "
                             f"{self.dp_size} data-parallel ranks")
        self.prompts_per_rank = g.prompts_per_episode // self.dp_size
        data = build_rl_prompt_iterator(self.cfg, self.prompts_per_rank, self.dp_rank, self.dp_size, state=state)
        self.prompts = PromptSource(data, self.prompts_per_rank, self.prompt_filter, data.ctx.tokenizer.pad_id)
        self.prompts.load_state_dict(self._prompt_state)
        return data

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
        s = c.algorithm.ssb
        self.buffer = SelectiveSampleBuffer(s.capacity, s.max_age, s.seed, s.min_abs_advantage) if s.enabled else None
        # SSB offline mode: prompts whose last groups had no signal are not rolled out again
        self.prompt_filter = PromptPoolFilter(s.offline_window) if s.offline_filter else None
        self._prompt_state: dict = {}  # restored into the PromptSource once build_data has made it
        self.reference = self.frozen_reference(resuming, "KL reference policy") if c.algorithm.grpo.kl_coef > 0 else None

    def _build_engine(self):
        from engine.rl.metrics import reasoning_word_token_ids
        from engine.rollout.factory import build_rollout_engine

        tok = self.data.ctx.tokenizer
        self.critical_ids = reasoning_word_token_ids(tok.hf, self.cfg.algorithm.metrics.reasoning_words)
        return build_rollout_engine(self.cfg, self.model, self.pg, tokenizer=tok.hf, tokenizer_dir=tok.path)

    def _judge_generate(self, prompts: list[str]) -> list[str]:
        """Model-verifier rewards run their judge prompts through the rollout engine (greedy)."""
        from engine.rollout.base import GenerationRequest, SamplingParams, stop_token_ids

        tok = self.engine.tokenizer
        reqs = [GenerationRequest(tok.encode(p, add_special_tokens=False)) for p in prompts]
        outs = self.engine.generate(reqs, SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=stop_token_ids(tok)))
        return [tok.decode(o.completions[0].token_ids, skip_special_tokens=True) for o in outs]

    def _any_rank_short(self, short: bool) -> bool:
        return self._global_sum([float(short)])[0] > 0

    # ------------------------------------------------------------------ one episode
    def train_step(self) -> dict:
        c = self.cfg
        t_start = time.perf_counter()
        if self.engine is None:
            self.engine = self._build_engine()
        self.engine.wake()
        push = self.engine.update_weights(self.model)
        episode = collect_episode(self.engine, self.prompts, self.reward_fn, c, step=self.step, buffer=self.buffer,
                                  seed=c.rollout.seed + 1000 * self.step + self.dp_rank,
                                  any_rank_short=self._any_rank_short)
        self.engine.sleep()
        t_train = time.perf_counter()
        steps = self.pack(episode)
        self.old_and_reference_logprobs([mb for step in steps for mb in step])
        lr = lr_at(self.step, c)
        set_lr(self.optimizer, lr)
        sums, grad_norms, skipped = self.gradient_steps(steps)
        self.step += 1
        record = self.episode_metrics(episode, [mb for step in steps for mb in step], sums)
        record.update({
            "step": self.step, "lr": lr, "grad_norm": grad_norms[-1] if grad_norms else float("nan"),
            "skipped": skipped, "skipped_steps": self.skipped_steps, "empty_steps": self.empty_steps,
            "rollout_time_s": episode.stats["rollout_time_s"], "train_time_s": time.perf_counter() - t_train,
            "step_time_s": time.perf_counter() - t_start, "weight_push_s": push.seconds,
        })
        return record

    def pack(self, episode: Episode) -> list[list[dict]]:
        """The episode's training rows -> per optimizer step, this rank's packed micro-batches (as many as every
        other DP rank's)."""
        c, g = self.cfg, self.cfg.algorithm.grpo
        tok = self.data.ctx.tokenizer
        steps = []
        for rows, adv in split_for_steps(episode.train_rows, episode.train_advantages,
                                         g.gradient_steps_per_episode // g.ppo_epochs):
            steps.append(pack_rollouts(rows, adv, c.train.seq_length, c.train.micro_batch_size, tok.pad_id,
                                       c.model.tokens_per_tile, c.model.image_token_id, c.model.vision.image_size))
        return even_over_ranks(steps, self.pg.dp)

    def old_and_reference_logprobs(self, micro: list[dict]) -> None:
        """old_logprobs / entropy (the policy now, before any update) and ref_logprobs (kl_coef > 0) per token."""
        c = self.cfg

        def loss(model):
            return lambda b: partial(token_logprobs_loss, b, self.pg.tp, c.model.llm.vocab_size,
                                     c.algorithm.grpo.temperature, c.train.loss_impl,
                                     weight=output_weight(model, c.train.loss_impl))
        with torch.no_grad():
            old = forward_backward(self.ddp, micro, self.pg, loss(self.model), forward_only=True)
            ref = (forward_backward(self.reference, micro, self.pg, loss(self.reference), forward_only=True)
                   if self.reference else None)
        for k, mb in enumerate(micro):
            mb["old_logprobs"], mb["entropy"] = old[k]["logprobs"], old[k]["entropy"]
            mb["ref_logprobs"] = ref[k]["logprobs"] if ref else None

    def gradient_steps(self, steps: list[list[dict]]) -> tuple[dict[str, float], list[float], bool]:
        """ppo_epochs passes over the mini-batches, one optimizer step each through Trainer.optimizer_step.
        Returns this rank's summed loss reports, the grad norms of the steps taken, and whether any was skipped."""
        c, g = self.cfg, self.cfg.algorithm.grpo
        weight = output_weight(self.model, c.train.loss_impl)
        loss = lambda b: partial(grpo_loss, b, self.pg.tp, c.model.llm.vocab_size, g, c.train.loss_impl,  # noqa: E731
                                 weight=weight)
        sums: dict[str, float] = {}
        grad_norms, skipped = [], False
        for _ in range(g.ppo_epochs):
            for micro in steps:
                self.ddp.zero_grad_buffer()
                self.optimizer.zero_grad()
                reports = forward_backward(self.ddp, micro, self.pg, loss)
                for r in reports:
                    for k, v in r.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                reporter = self._is_loss_reporter()  # one per DP replica (TP ranks hold the same sums)
                local = [sum(float(r[k]) for r in reports) if reporter else 0.0 for k in ("loss_sum", "count")]
                step_loss, step_count = self._global_sum(local)
                stepped, grad_norm = self.optimizer_step(step_loss / max(step_count, 1.0), step_count)
                grad_norms += [grad_norm] if stepped else []
                skipped |= not stepped
        return sums, grad_norms, skipped

    def episode_metrics(self, episode: Episode, micro: list[dict], sums: dict[str, float]) -> dict:
        """This rank's metrics of the episode, then the mean over DP ranks."""
        from engine.rl.metrics import logprob_mismatch, rl_step_metrics

        c, g, s = self.cfg, self.cfg.algorithm.grpo, episode.stats
        def on_host(key: str) -> torch.Tensor:  # the forward passes left old log-probs / entropy on the device
            return torch.cat([mb[key].cpu() for mb in micro])

        mask, entropy, labels = on_host("loss_mask"), on_host("entropy"), on_host("labels")
        m = rl_step_metrics(
            rewards=episode.rewards, reward_components=episode.components, advantages=episode.advantages,
            response_lengths=torch.tensor([len(x.response_ids) for x in episode.samples], dtype=torch.float),
            entropy=entropy, token_ids=labels, loss_mask=mask, critical_ids=self.critical_ids,
            entropy_threshold=c.algorithm.metrics.entropy_threshold, responses=[x.response_text for x in episode.samples],
            hallucination_phrases=c.algorithm.metrics.hallucination_phrases,
            ratio_with_buffer=s.get("ratio_with_buffer"), reward_counter=episode.reward_counter,
        )
        if g.temperature == 1.0:  # engines report raw (T=1) log-probs
            m.update(logprob_mismatch(on_host("old_logprobs"), on_host("rollout_logprobs"), mask))
        tok = max(sums.get("tokens", 0.0), 1.0)
        self.truncated_at_image_token += s.get("truncated_at_image_token", 0)
        m.update({
            "loss": sums.get("loss_sum", 0.0) / max(sums.get("count", 0.0), 1.0),
            "clip_frac_low": sums.get("clip_low_sum", 0.0) / tok, "clip_frac_high": sums.get("clip_high_sum", 0.0) / tok,
            "dual_clip_frac": sums.get("dual_clip_sum", 0.0) / tok, "kl": sums.get("kl_sum", 0.0) / tok,
            "ratio_mean": sums.get("ratio_sum", 0.0) / tok, "row_fill": row_fill(micro),
            "reward_mean_all": s["reward_mean_all"], "accuracy_all": s["accuracy_all"],
            "truncated_ratio": s["truncated"] / max(s["generated"], 1),  # generated responses cut at the limit
        })
        self._dump_rollouts(episode)
        record = self._average_over_dp(m)
        record.update({"dropped_groups": s["dropped_groups"], "topped_up_groups": s["topped_up_groups"],
                       "rollout_rounds": s["rollout_rounds"], "samples": len(episode.samples) * self.dp_size,
                       "truncated_at_image_token": self.truncated_at_image_token,
                       "data_skipped": self.data_skipped()})  # collective: every DP rank's skips, kept across resumes
        if self.prompt_filter is not None:  # summed over DP ranks: prompts skipped so far, exhausted now
            f = self.prompt_filter
            skipped_total, exhausted = self._global_sum([float(self.prompts.filtered),
                                                         float(sum(f.is_exhausted(p) for p in f.history))])
            record.update({"prompts_filtered_total": skipped_total, "prompts_exhausted": exhausted})
        return record

    def _dump_rollouts(self, episode: Episode, k: int = 4) -> None:
        """Rank 0 appends its first k samples of the episode to <run_dir>/rollouts.jsonl (to read, not parse)."""
        if self.rank != 0:
            return
        import json

        rows = zip(episode.samples, episode.rewards.tolist(), episode.advantages.tolist())
        with (Path(self.cfg.train.run_dir) / "rollouts.jsonl").open("a") as f:
            for s, r, a in list(rows)[:k]:
                f.write(json.dumps({"step": self.step, "id": s.sample_id, "gold": s.gold, "reward": r,
                                    "advantage": a, "response": s.response_text}) + "\n")

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
        return {"ssb": self.buffer.state_dict() if self.buffer is not None else None, **self.prompts.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.buffer is not None and state.get("ssb"):
            self.buffer.load_state_dict(state["ssb"])
        self._prompt_state = state  # build_data (after this) hands it to the PromptSource


def run(cfg, resume: str | None = None) -> int:
    trainer = GRPOTrainer(cfg, resume=resume)
    code = trainer.fit()
    if trainer.engine is not None:
        trainer.engine.close()
    from engine.parallel.init import shutdown

    shutdown()
    return code
