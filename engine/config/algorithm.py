"""RL / preference algorithm sub-config: GRPO, dynamic sampling, Selective Sample Buffer, MPO, rewards,
decoding modes, iterative-SFT selection and RL metrics (the math lives in engine/rl/).

Defaults follow R1V3 GRPO where the reports differ; the R1V / R1V2 / R1V3 settings are in PRESETS
(the recipes in recipes/ write them out):
  R1V  GRPO: 8 samples/prompt, temperature 1.0, max completion 8k, rule rewards (accuracy + format), lr 1e-6.
  R1V2 GRPO: hybrid reward r_rule + r_θ + r_format, std-normalised advantages, KL penalty, SSB on;
       MPO: w1·DPO + w2·BCO + w3·NLL with δ a moving average of rewards; pair reward-gap threshold 7/10/15.
  R1V3 GRPO: no KL, reward ε·acc + (1-ε)·format with ε = 0.8, PPO clip 0.2, 32 samples/prompt,
       1024 rollouts/episode, mini-batch 32, 1 gradient step per episode, max response 4096 -> 8192.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_

# kernels/aggregation.py (AGGREGATION_MODES, checked equal in tests): the config must not import the kernels
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _grpo_stage(root) -> bool:
    """The root config trains GRPO (False when the algorithm section is validated on its own)."""
    return getattr(getattr(root, "train", None), "stage", None) == "grpo" and hasattr(root, "data")


@dataclass
class GRPOConfig:
    group_size: int = field_(32, "samples per prompt G (R1V3: 32; R1V: 8)", bounds="[1, inf)")
    rollouts_per_episode: int = field_(1024, "samples generated per episode (R1V3: 1024 = 32 prompts x 32)",
                                       bounds="[1, inf)")
    mini_batch_size: int = field_(32, "prompts per gradient step, verl's ppo_mini_batch_size (R1V3: 32 prompts x 32 "
                                      "samples = the whole 1024-rollout episode, so one on-policy step)",
                                      bounds="[1, inf)")
    ppo_epochs: int = field_(1, "passes over the episode's mini-batches (R1V3: 1)", bounds="[1, inf)")
    advantage: Literal["grpo", "mean_only"] = field_("grpo", "(r - mean)/(std + eps) or Dr.GRPO mean-only")
    advantage_eps: float = field_(1e-6, "eps added to the group std", bounds="(0, inf)")
    clip_eps_low: float = field_(0.2, "lower PPO clip ε_low (R1V3: 0.2)", bounds="[0, 1)")
    clip_eps_high: float = field_(0.2, "upper PPO clip ε_high; > ε_low is Clip-Higher (DAPO uses 0.28)",
                                  bounds="[0, inf)")
    dual_clip_c: float | None = field_(None, "dual-clip bound c > 1 for negative advantages (null: off)",
                                       bounds="(1, inf)")
    kl_coef: float = field_(0.0, "KL-to-reference coefficient β; 0 keeps no reference model (R1V3: 0)",
                            bounds="[0, inf)")
    kl_estimator: Literal["k1", "k2", "k3"] = field_("k3", "KL estimator on log-probs")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = field_(
        "token-mean", "how per-token losses reduce to the step loss, per sample (kernels/aggregation.py); "
                      "seq-mean-token-sum-norm divides each sample's sum by max_response_length (Dr.GRPO)")
    seq_mean_counts_empty: bool = field_(
        False, "seq-mean modes: a sample with no learned token (e.g. overlong-masked) counts in the mean with loss 0 "
               "(TRL's convention) instead of being left out")
    temperature: float = field_(1.0, "rollout sampling temperature (all three reports: 1.0)", bounds="(0, inf)")
    top_p: float = field_(1.0, "rollout nucleus sampling", bounds="(0, 1]")
    max_response_length: int = field_(8192, "max generated tokens per sample (R1V: 8k; R1V3: 4096 -> 8192)",
                                      bounds="[1, inf)")
    dynamic_sampling: bool = field_(False, "drop groups whose rewards are all equal and refill the batch")
    dynamic_sampling_max_rounds: int = field_(8, "rollout rounds per batch before dynamic sampling gives up",
                                              bounds="[1, inf)")
    overlong: Literal["keep", "zero_reward", "mask"] = field_(
        "zero_reward", "a response cut at max_response_length: keep its reward, score it 0, or DAPO overlong "
                       "filtering (in the group's advantage, out of the loss)")

    def validate(self, root) -> None:
        if self.group_size < 2 and self.advantage == "grpo":
            raise ConfigError(f"algorithm.grpo.group_size={self.group_size}: GRPO needs >= 2 samples per prompt")
        if self.rollouts_per_episode % self.group_size:
            raise ConfigError(f"algorithm.grpo.rollouts_per_episode={self.rollouts_per_episode} is not a multiple of "
                              f"group_size={self.group_size}")
        if self.mini_batch_size < 1 or self.rollouts_per_episode % (self.mini_batch_size * self.group_size):
            raise ConfigError(f"algorithm.grpo.rollouts_per_episode={self.rollouts_per_episode} is not a multiple of "
                              f"mini_batch_size x group_size = {self.mini_batch_size} x {self.group_size} "
                              "(mini_batch_size counts prompts)")
        if self.ppo_epochs < 1:
            raise ConfigError("algorithm.grpo.ppo_epochs must be >= 1")
        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ConfigError(f"algorithm.grpo clip eps must satisfy 0 <= clip_eps_low < 1 and clip_eps_high >= 0 "
                              f"(got {self.clip_eps_low}, {self.clip_eps_high})")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ConfigError(f"algorithm.grpo.dual_clip_c={self.dual_clip_c} must be > 1 (or null to disable)")
        if self.kl_coef < 0:
            raise ConfigError(f"algorithm.grpo.kl_coef={self.kl_coef} must be >= 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("algorithm.grpo.temperature must be > 0 and top_p in (0, 1]")
        if self.seq_mean_counts_empty and self.loss_agg_mode == "token-mean":
            raise ConfigError("algorithm.grpo.seq_mean_counts_empty acts only in the seq-mean loss_agg_modes; "
                              "with token-mean an empty sample adds nothing either way: leave it false")
        train = getattr(root, "train", None)
        if _grpo_stage(root) and train.global_batch_size != self.mini_batch_size * self.group_size:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size}: in GRPO an optimizer step takes "
                f"algorithm.grpo.mini_batch_size x group_size = {self.mini_batch_size} x {self.group_size} = "
                f"{self.mini_batch_size * self.group_size} samples (over all DP ranks, packed into rows of "
                f"train.seq_length); set train.global_batch_size={self.mini_batch_size * self.group_size} or change "
                "mini_batch_size")

    @property
    def prompts_per_episode(self) -> int:
        return self.rollouts_per_episode // self.group_size

    @property
    def gradient_steps_per_episode(self) -> int:
        """Optimizer steps per episode: mini-batches per episode x ppo_epochs (R1V3: 1)."""
        return self.rollouts_per_episode // (self.mini_batch_size * self.group_size) * self.ppo_epochs


@dataclass
class SSBConfig:
    enabled: bool = field_(False, "R1V2 Selective Sample Buffer on")
    capacity: int = field_(4096, "samples kept (oldest evicted first)", bounds="[1, inf)")
    max_age: int = field_(8, "steps a buffered sample stays usable", bounds="[0, inf)")
    min_abs_advantage: float = field_(0.0, "only samples with |A| above this are buffered", bounds="[0, inf)")
    max_mix_fraction: float = field_(1.0, "at most this share of an update's zero-advantage slots is refilled",
                                     bounds="[0, 1]")
    offline_filter: bool = field_(False, "drop prompts whose last groups all had zero advantage before rollout")
    offline_window: int = field_(1, "how many recent groups of a prompt must all be zero-advantage to drop it",
                                 bounds="[1, inf)")
    seed: int = field_(0, "seed of the buffer's draw generator", bounds="[0, inf)")

    def validate(self, root) -> None:
        if self.capacity < 1 or self.max_age < 0 or self.offline_window < 1:
            raise ConfigError("algorithm.ssb needs capacity >= 1, max_age >= 0 and offline_window >= 1")
        if not 0.0 <= self.max_mix_fraction <= 1.0:
            raise ConfigError(f"algorithm.ssb.max_mix_fraction={self.max_mix_fraction} must be in [0, 1]")


@dataclass
class MPOConfig:
    beta: float = field_(0.1, "β of the implicit reward β·log(π/π0)", bounds="(0, inf)")
    w_pref: float = field_(0.8, "w1, DPO preference term (InternVL MPO: 0.8)", bounds="[0, inf)")
    w_quality: float = field_(0.2, "w2, BCO quality term (InternVL MPO: 0.2)", bounds="[0, inf)")
    w_gen: float = field_(1.0, "w3, length-normalised NLL on the chosen response (InternVL MPO: 1.0)",
                          bounds="[0, inf)")
    delta_momentum: float | None = field_(None, "BCO δ: null = running mean (see delta_average), else EMA momentum",
                                          bounds="[0, 1)")
    delta_average: Literal["rewards", "batch_means"] = field_(
        "rewards", "BCO δ's running mean: over every implicit reward seen, or over the steps' batch means "
                   "(TRL's bco_pair: RunningMoments updated with each batch's mean)")
    nll_norm: Literal["sequence", "token"] = field_(
        "sequence", "NLL term: mean over pairs of -log π(y_c)/|y_c| (length-normalised), or Σ -log π / Σ |y_c| over "
                    "a micro-batch's chosen tokens (token mean, TRL's DPO 'sft' / rpo loss)")
    pair_reward_gap: float = field_(
        0.0, "use only pairs with chosen_score - rejected_score >= this (R1V2 'MPO threshold' 7/10/15, 15 best; "
             "0: every pair, scores optional)", bounds="[0, inf)")

    def validate(self, root) -> None:
        if self.beta <= 0:
            raise ConfigError(f"algorithm.mpo.beta={self.beta} must be > 0")
        if self.pair_reward_gap < 0:
            raise ConfigError(f"algorithm.mpo.pair_reward_gap={self.pair_reward_gap} must be >= 0 (0: every pair)")
        if min(self.w_pref, self.w_quality, self.w_gen) < 0:
            raise ConfigError("algorithm.mpo weights w_pref/w_quality/w_gen must be >= 0")
        if self.delta_momentum is not None and not 0 <= self.delta_momentum < 1:
            raise ConfigError(f"algorithm.mpo.delta_momentum={self.delta_momentum} must be in [0, 1) or null")


@dataclass
class RewardConfig:
    name: Literal["rule", "format", "verifier", "r1v", "r1v2", "r1v3", "r1v3_rule"] = field_(
        "r1v3", "reward (engine/rl/rewards.py): r1v = rule+format, r1v2 = rule+verifier+format, "
                "r1v3 = ε·(rule OR verifier) + (1-ε)·format, r1v3_rule = ε·rule + (1-ε)·format")
    epsilon: float = field_(0.8, "R1V3 accuracy weight ε", bounds="[0, 1]")
    math_verify_timeout_s: float = field_(5.0, "per-answer time bound of the math-verify check", bounds="(0, inf)")
    math_verify_workers: int = field_(2, "worker processes for math-verify", bounds="[1, inf)")
    math_verify_backend: Literal["process", "thread"] = field_("process", "time bound by killable processes or a thread deadline")
    prompt_opens_think: bool = field_(True, "the prompt ends with '<think>' (think mode): responses start inside it")
    verifier_template: str = field_("", "judge prompt with {question} {gold} {answer} (empty: the built-in one)")

    def validate(self, root) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"algorithm.reward.epsilon={self.epsilon} must be in [0, 1]")
        if self.math_verify_timeout_s <= 0 or self.math_verify_workers < 1:
            raise ConfigError("algorithm.reward.math_verify_timeout_s must be > 0 and math_verify_workers >= 1")
        if self.verifier_template:
            missing = [k for k in ("{question}", "{gold}", "{answer}") if k not in self.verifier_template]
            if missing:
                raise ConfigError(f"algorithm.reward.verifier_template lacks {missing}")
        opens = _grpo_stage(root) and root.data.thinking == "think"
        if _grpo_stage(root) and self.name not in ("rule", "verifier") and self.prompt_opens_think != opens:
            raise ConfigError(
                f"algorithm.reward.prompt_opens_think={str(self.prompt_opens_think).lower()} but the rollout prompts "
                f"{'open' if opens else 'do not open'} '<think>' (data.thinking={root.data.thinking}): the format reward "
                f"would score every response against the wrong prompt; set prompt_opens_think={str(opens).lower()}")


@dataclass
class DecodingConfig:
    mode: Literal["think", "nothink", "nowait", "budget"] = field_("think", "R1V3 decoding mode")
    banned_words: list[str] = field_(factory=lambda: ["Wait", "Alternatively", "Hmm"], help="NoWait: words banned by logit bias")
    ban_bias: float = field_(-math.inf, "logit bias for banned ids (-inf, or e.g. -100)", bounds="[-inf, 0]")
    ban_multi_token: Literal["auto", "first", "all"] = field_(
        "auto", "words split into several tokens: auto = ban single-token variants (first piece if none), all = every piece")
    thinking_budget: int | None = field_(None, "budget mode: thinking tokens before '</think>' is forced (1k..16k)",
                                         bounds="[0, inf)")
    answer_prefix: str = field_("", "text forced after '</think>' when the budget runs out")
    alcotd_alpha: float = field_(1.0, "AL-CoTD α (R1V eq. 1)", bounds="[0, inf)")
    alcotd_beta: float = field_(1.0, "AL-CoTD β, weight of the text score", bounds="[0, inf)")
    alcotd_gamma: float = field_(1.0, "AL-CoTD γ, weight of the integration score", bounds="[0, inf)")

    def validate(self, root) -> None:
        if self.mode == "budget" and (self.thinking_budget is None or self.thinking_budget < 0):
            raise ConfigError("algorithm.decoding.mode=budget needs thinking_budget >= 0 (e.g. 1024)")
        if self.mode != "budget" and (self.thinking_budget is not None or self.answer_prefix):
            raise ConfigError(f"algorithm.decoding.thinking_budget / answer_prefix act only in mode=budget (mode is "
                              f"{self.mode}); unset them or set algorithm.decoding.mode=budget")
        if self.mode == "nowait" and not self.banned_words:
            raise ConfigError("algorithm.decoding.mode=nowait needs banned_words")
        if self.ban_bias > 0:
            raise ConfigError(f"algorithm.decoding.ban_bias={self.ban_bias} must be <= 0 (it bans words)")
        thinking = "no_think" if self.mode == "nothink" else "think"
        if _grpo_stage(root) and root.data.thinking != thinking:
            raise ConfigError(
                f"algorithm.decoding.mode={self.mode} needs rollout prompts that {'do not ' * (thinking == 'no_think')}"
                f"open '<think>': set data.thinking={thinking} (the GRPO prompts are built with data.thinking)")


@dataclass
class IterativeSFTConfig:
    tau_schedule: list[float] = field_(factory=lambda: [2.0, 3.0, 4.0, 5.0], help="RM threshold τ_t per iteration (R1V)",
                                       bounds="(-inf, inf)")
    lrs: list[float] = field_(factory=lambda: [1e-4, 2e-5, 2e-5, 2e-5], help="lr per iteration (R1V: 1e-4, then 2e-5)",
                              bounds="(0, inf)")
    score_field: str = field_("rm_score", "JSONL field with each SFT sample's reward-model score (0-5)")
    epochs_per_iteration: float = field_(1.0, "passes over the selected samples per iteration (R1V: 1)",
                                         bounds="(0, inf)")
    probe_max_tokens: int = field_(512, "greedy answer length when finding the samples a model answers wrong",
                                   bounds="[1, inf)")

    def validate(self, root) -> None:
        if len(self.lrs) != len(self.tau_schedule):
            raise ConfigError(f"algorithm.iterative_sft: {len(self.tau_schedule)} τ values but {len(self.lrs)} lrs; "
                              "give one lr per iteration")
        if any(b < a for a, b in zip(self.tau_schedule, self.tau_schedule[1:])):
            raise ConfigError(f"algorithm.iterative_sft.tau_schedule={self.tau_schedule} should not decrease")


@dataclass
class RLMetricsConfig:
    reasoning_words: list[str] = field_(factory=lambda: ["Wait", "Alternatively", "Hmm"], help="critical-token entropy words")
    entropy_threshold: float = field_(6.8, "high-entropy token threshold in nats (R1V3: 6.8)", bounds="[0, inf)")
    hallucination_phrases: list[str] = field_(
        factory=lambda: ["can't see the image", "cannot see the image", "can not see the image", "unable to see the image",
                         "no image", "image is not provided", "image was not provided", "don't have access to the image"],
        help="phrases counted in the reasoning as 'cannot see the image' hallucinations")
    select_checkpoint_by: Literal["critical_token_entropy", "val_accuracy"] = field_(
        "val_accuracy", "checkpoint selection metric (R1V3 uses critical-token entropy)")


@dataclass
class AlgorithmConfig:
    grpo: GRPOConfig = field_(factory=GRPOConfig, help="GRPO")
    ssb: SSBConfig = field_(factory=SSBConfig, help="Selective Sample Buffer")
    mpo: MPOConfig = field_(factory=MPOConfig, help="Mixed Preference Optimization")
    reward: RewardConfig = field_(factory=RewardConfig, help="reward functions")
    decoding: DecodingConfig = field_(factory=DecodingConfig, help="decoding mode for rollout / evaluation")
    iterative_sft: IterativeSFTConfig = field_(factory=IterativeSFTConfig, help="R1V iterative SFT selection")
    metrics: RLMetricsConfig = field_(factory=RLMetricsConfig, help="RL metrics")


# The reports' settings as override mappings for `algorithm` (the recipes write them out).
PRESETS: dict[str, dict] = {
    "r1v": {
        # the report gives G=8, T=1.0, 8k completions, lr 1e-6; episode size and KL are not given (our choice)
        "grpo": {"group_size": 8, "rollouts_per_episode": 256, "mini_batch_size": 32, "max_response_length": 8192,
                 "temperature": 1.0, "kl_coef": 0.0},
        "reward": {"name": "r1v"},
    },
    "r1v2": {
        # "clipped surrogate with KL penalty": the coefficient is not given, 0.001 is verl's default
        "grpo": {"group_size": 8, "rollouts_per_episode": 256, "mini_batch_size": 32, "kl_coef": 0.001},
        "reward": {"name": "r1v2"},
        "ssb": {"enabled": True, "offline_filter": True},
        "mpo": {"pair_reward_gap": 15.0},
    },
    "r1v3": {
        "grpo": {"group_size": 32, "rollouts_per_episode": 1024, "mini_batch_size": 32, "ppo_epochs": 1,
                 "clip_eps_low": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.0, "max_response_length": 8192},
        "reward": {"name": "r1v3", "epsilon": 0.8},
        "metrics": {"select_checkpoint_by": "critical_token_entropy", "entropy_threshold": 6.8},
    },
}
