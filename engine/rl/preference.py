"""R1V2 Mixed Preference Optimization (MPO): L = w1·L_pref (DPO) + w2·L_quality (BCO) + w3·L_gen (NLL).

Inputs are summed sequence log-probs [B] of the policy π_θ and the frozen reference π_0 for the
chosen (y_c) and rejected (y_r) responses, and the chosen lengths |y_c| [B] (response tokens).
With implicit rewards  r_c = β·(log π_θ(y_c|x) - log π_0(y_c|x)),  r_r = β·(log π_θ(y_r|x) - log π_0(y_r|x)):
  L_pref    = -log σ(r_c - r_r)
  L_quality = -log σ(r_c - δ) - log σ(-(r_r - δ))           δ = moving average of past rewards
  L_gen     = -log π_θ(y_c|x) / |y_c|                          (or the batch's token mean: nll_norm="token")
each averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RewardShift:
    """δ for the BCO term: a running mean of the implicit rewards (r_c and r_r) seen so far.

    momentum=None, average="rewards":     the mean of every reward seen (each reward weighs the same);
    momentum=None, average="batch_means": the mean of the batches' means (each step weighs the same: TRL's
                                          bco_pair, whose RunningMoments is updated with one batch mean a step);
    momentum=m:                           an EMA δ ← m·δ + (1-m)·mean(batch), started at the first batch.
    The two running means differ when batches differ in size (pair filtering, the last batch of an epoch).
    Kept in checkpoints via state_dict(); under data parallel, pass the all-gathered rewards.
    """

    def __init__(self, momentum: float | None = None, average: str = "rewards"):
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"RewardShift momentum must be in [0, 1) or None, got {momentum}")
        if average not in ("rewards", "batch_means"):
            raise ValueError(f"RewardShift average must be 'rewards' or 'batch_means', got {average!r}")
        self.momentum, self.average = momentum, average
        self.value = 0.0
        self.count = 0    # rewards folded in
        self.batches = 0  # update() calls with rewards

    def update(self, rewards: torch.Tensor) -> float:
        """Fold a batch of rewards in; returns the new δ."""
        rewards = rewards.detach().double().flatten()
        n = rewards.numel()
        if n == 0:
            return self.value
        batch_mean = float(rewards.mean())
        if self.count == 0:
            self.value = batch_mean
        elif self.momentum is not None:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * batch_mean
        elif self.average == "rewards":
            self.value = (self.value * self.count + batch_mean * n) / (self.count + n)
        else:
            self.value = (self.value * self.batches + batch_mean) / (self.batches + 1)
        self.count += n
        self.batches += 1
        return self.value

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "average": self.average, "value": self.value, "count": self.count,
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.value, self.count = state["momentum"], state["value"], state["count"]
        self.average = state.get("average", "rewards")  # checkpoints from before the option: the rewards mean
        self.batches = state.get("batches", 1 if self.count else 0)


@dataclass
class MPOOutput:
    loss: torch.Tensor             # scalar: w1·pref + w2·quality + w3·gen
    pref: torch.Tensor             # scalar DPO term (unweighted)
    quality: torch.Tensor          # scalar BCO term (unweighted)
    gen: torch.Tensor              # scalar length-normalised NLL (unweighted)
    chosen_rewards: torch.Tensor   # [B] detached r_c
    rejected_rewards: torch.Tensor  # [B] detached r_r
    reward_margin: torch.Tensor    # scalar mean(r_c - r_r)
    reward_accuracy: torch.Tensor  # scalar share with r_c > r_r
    delta: float


def mpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, *,
             beta: float = 0.1, delta: float = 0.0, w_pref: float = 0.8, w_quality: float = 0.2,
             w_gen: float = 1.0, nll_norm: str = "sequence") -> MPOOutput:
    """The MPO loss for a batch of preference pairs (see module docstring); δ is given, not updated.
    nll_norm="sequence": L_gen = mean_b(-log π(y_c,b) / |y_c,b|); "token": L_gen = Σ_b -log π(y_c,b) / Σ_b |y_c,b|
    (the batch's token mean, TRL's DPO 'sft' / rpo NLL: long responses weigh more)."""
    if nll_norm not in ("sequence", "token"):
        raise ValueError(f"nll_norm must be 'sequence' or 'token', got {nll_norm!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, chosen_lengths)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"MPO inputs must all be [B] (summed log-probs per sequence, lengths), got shapes {shapes}")
    if bool((chosen_lengths <= 0).any()):
        raise ValueError("chosen_lengths must be >= 1 response token for every pair (empty chosen response?)")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    r_c, r_r = beta * chosen_logratio, beta * rejected_logratio
    pref = -F.logsigmoid(r_c - r_r).mean()
    quality = (-F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))).mean()
    lengths = chosen_lengths.to(policy_chosen_logps.dtype)
    gen = (-policy_chosen_logps / lengths).mean() if nll_norm == "sequence" else -policy_chosen_logps.sum() / lengths.sum()
    loss = w_pref * pref + w_quality * quality + w_gen * gen
    r_c_d, r_r_d = r_c.detach(), r_r.detach()
    return MPOOutput(
        loss=loss, pref=pref, quality=quality, gen=gen,
        chosen_rewards=r_c_d, rejected_rewards=r_r_d,
        reward_margin=(r_c_d - r_r_d).mean(),
        reward_accuracy=(r_c_d > r_r_d).float().mean(),
        delta=delta,
    )


def mpo_step_loss(shift: RewardShift, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
                  **kw) -> MPOOutput:
    """Stateful form: update δ with this batch's rewards first (as TRL's BCO does), then compute the loss."""
    beta = kw.get("beta", 0.1)
    with torch.no_grad():
        r_c = beta * (policy_chosen_logps - ref_chosen_logps)
        r_r = beta * (policy_rejected_logps - ref_rejected_logps)
        delta = shift.update(torch.cat([r_c, r_r]))
    return mpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, delta=delta, **kw)
