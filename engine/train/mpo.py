"""R1V2 MPO stage: w1·DPO + w2·BCO + w3·NLL against a frozen reference model.

Micro-batches hold preference pairs: rows 2i (chosen) and 2i+1 (rejected) share the prompt and image.
Each step first runs the frozen reference (the policy's weights when the run started, kept in
<run_dir>/reference so a resumed run uses the same π0) forward-only over the step's micro-batches,
then the policy forward/backward with the MPO loss. megatron divides the gradients by the number of
pairs in the global batch. δ (BCO's reward shift) is the running mean of the implicit rewards of the
previous steps, updated after each step and saved in checkpoints.
"""

from __future__ import annotations

from functools import partial
import torch

from engine.rl.preference import RewardShift, mpo_loss
from engine.train.losses import output_weight
from engine.train.step import forward_backward, sequence_logprobs
from engine.train.trainer import Trainer


def _reference_logps_loss(batch, tp_group, impl, vocab_size, output, *, weight=None):
    seq_logps, _ = sequence_logprobs(batch, tp_group, impl, vocab_size, output, weight=weight)
    return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"seq_logps": seq_logps.detach()}


def _mpo_micro_loss(batch, tp_group, impl, vocab_size, mcfg, delta, output, *, weight=None):
    seq_logps, lengths = sequence_logprobs(batch, tp_group, impl, vocab_size, output, weight=weight)  # (2P,), (2P,)
    ref = batch["ref_seq_logps"]
    out = mpo_loss(seq_logps[0::2], seq_logps[1::2], ref[0::2], ref[1::2], lengths[0::2],
                   beta=mcfg.beta, delta=delta, w_pref=mcfg.w_pref, w_quality=mcfg.w_quality, w_gen=mcfg.w_gen)
    pairs = seq_logps.shape[0] // 2
    report = {
        "loss_sum": out.loss.detach() * pairs, "count": pairs,
        "pref_sum": out.pref.detach() * pairs, "quality_sum": out.quality.detach() * pairs,
        "gen_sum": out.gen.detach() * pairs, "margin_sum": out.reward_margin * pairs,
        "accuracy_sum": out.reward_accuracy * pairs,
        "reward_sum": (out.chosen_rewards.sum() + out.rejected_rewards.sum()), "reward_count": 2 * pairs,
    }
    return out.loss * pairs, torch.tensor(pairs, dtype=torch.int), report


class MPOTrainer(Trainer):
    def setup_stage(self, resuming: bool) -> None:
        if self.cfg.data.format != "preference":
            raise ValueError(f"train.stage=mpo needs data.format=preference (got {self.cfg.data.format}); "
                             "the data must hold chosen/rejected pairs")
        self.shift = RewardShift(self.cfg.algorithm.mpo.delta_momentum)
        self.reference = self.frozen_reference(resuming, "MPO reference policy pi_0")

    def prepare(self, microbatches: list[dict]) -> None:
        c = self.cfg
        with torch.no_grad():
            reports = forward_backward(
                self.reference, microbatches, self.pg,
                lambda batch: partial(_reference_logps_loss, batch, self.pg.tp, c.train.loss_impl,
                                      c.model.llm.vocab_size, weight=output_weight(self.reference, c.train.loss_impl)),
                forward_only=True,
            )
        for mb, rep in zip(microbatches, reports or [None] * len(microbatches)):
            mb["ref_seq_logps"] = rep["seq_logps"] if rep is not None else None

    def loss_factory(self):
        c = self.cfg
        delta = self.shift.value
        weight = output_weight(self.model, c.train.loss_impl)
        return lambda batch: partial(_mpo_micro_loss, batch, self.pg.tp, c.train.loss_impl, c.model.llm.vocab_size,
                                     c.algorithm.mpo, delta, weight=weight)

    def report_sums(self, reports: list[dict]) -> dict[str, float]:
        keys = reports[0].keys()
        return {k: float(sum(float(r[k]) for r in reports)) for k in keys}

    def finish_metrics(self, sums: dict[str, float]) -> dict:
        pairs = max(sums["count"], 1.0)
        delta_used = self.shift.value
        if sums["reward_count"] > 0:  # every rank folds in the same global mean, so δ stays identical
            self.shift.update(torch.full((int(sums["reward_count"]),), sums["reward_sum"] / sums["reward_count"]))
        return {
            "pairs": int(sums["count"]), "loss_pref": sums["pref_sum"] / pairs,
            "loss_quality": sums["quality_sum"] / pairs, "loss_gen": sums["gen_sum"] / pairs,
            "reward_margin": sums["margin_sum"] / pairs, "reward_accuracy": sums["accuracy_sum"] / pairs,
            "delta": delta_used,
        }

    def extra_state(self) -> dict:
        return {"mpo_reward_shift": self.shift.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "mpo_reward_shift" in state:
            self.shift.load_state_dict(state["mpo_reward_shift"])


def run(cfg, resume: str | None = None) -> int:
    trainer = MPOTrainer(cfg, resume=resume)
    code = trainer.fit()
    from engine.parallel.init import shutdown

    shutdown()
    return code

