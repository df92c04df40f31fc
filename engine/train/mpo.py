"""R1V2 MPO stage: w1·DPO + w2·BCO + w3·NLL against a frozen reference model.

Micro-batches hold preference pairs as segments of their rows: unpacked, chosen of pair i in row 2i and
rejected in row 2i+1; packed (data.packing), as many pairs as fit the micro-batch's 2 x micro_batch_size rows,
both sequences of a pair in the same micro-batch. `sequence_index` says which sequence (2 * pair + 0 chosen /
1 rejected) each token belongs to, so per-sequence log-probs do not depend on the layout. Each step first runs the frozen reference (the policy's weights when the run started, kept in
<run_dir>/reference so a resumed run uses the same π0) forward-only over the step's micro-batches,
then the policy forward/backward with the MPO loss. megatron divides the gradients by the number of
pairs in the global batch. δ (BCO's reward shift) is the running mean of the implicit rewards of the
previous steps, updated after each step and saved in checkpoints.
"""

from __future__ import annotations

from functools import partial
import torch

from engine.rl.preference import RewardShift, mpo_loss
from engine.train.losses import output_weight, token_logprobs
from engine.train.step import forward_backward
from engine.train.trainer import Trainer


def packed_sequence_logprobs(batch, tp_group, impl, vocab_size, output, *, weight=None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the learned (response) tokens of every sequence j of the micro-batch (wherever its
    tokens sit: batch["sequence_index"], -1 on padding) and the number of such tokens: (2P,), (2P,).
    output: the logits, or the hidden states with impl=fused_linear (`weight`: the output layer's shard)."""
    logprobs, _ = token_logprobs(output, batch["labels"], tp_group, impl, vocab_size=vocab_size, weight=weight,
                                 loss_mask=batch["loss_mask"], inplace_backward=True)  # (b, s)
    index = batch["sequence_index"]
    mask = batch["loss_mask"].float() * (index >= 0)
    n = batch["pair_index"].numel()
    flat = index.clamp(min=0).reshape(-1)  # padding adds 0 to sequence 0 (no boolean indexing: no device sync)
    sums = logprobs.new_zeros(n).index_add(0, flat, (logprobs * mask).reshape(-1))
    counts = mask.new_zeros(n).index_add(0, flat, mask.reshape(-1))
    return sums, counts


def _reference_logps_loss(batch, tp_group, impl, vocab_size, output, *, weight=None):
    seq_logps, _ = packed_sequence_logprobs(batch, tp_group, impl, vocab_size, output, weight=weight)
    return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"seq_logps": seq_logps.detach()}


def _mpo_micro_loss(batch, tp_group, impl, vocab_size, mcfg, delta, output, *, weight=None):
    seq_logps, lengths = packed_sequence_logprobs(batch, tp_group, impl, vocab_size, output, weight=weight)  # (2P,)
    if seq_logps.numel() == 0:  # every pair of this micro-batch failed to load (counted as skips)
        zero = output.sum() * 0.0  # keeps the graph (the schedule runs backward on it)
        keys = ("loss_sum", "pref_sum", "quality_sum", "gen_sum", "margin_sum", "accuracy_sum", "reward_sum")
        return zero, torch.tensor(0, dtype=torch.int), {**{k: zero.detach() for k in keys}, "count": 0,
                                                         "reward_count": 0}
    ref = batch["ref_seq_logps"]
    out = mpo_loss(seq_logps[0::2], seq_logps[1::2], ref[0::2], ref[1::2], lengths[0::2],
                   beta=mcfg.beta, delta=delta, w_pref=mcfg.w_pref, w_quality=mcfg.w_quality, w_gen=mcfg.w_gen,
                   nll_norm=mcfg.nll_norm)
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
        self.shift = RewardShift(self.cfg.algorithm.mpo.delta_momentum, self.cfg.algorithm.mpo.delta_average)
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

