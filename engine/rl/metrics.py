"""Per-step RL metrics from tensors and texts: rewards by component, accuracy, lengths, clip
fractions, KL, entropy (mean, critical-token, high-entropy share), effective-sample ratio and the
"can't see the image" hallucination rate (R1V2 §5, R1V3 §5-6). Returns flat dicts of floats for
metrics.jsonl / TensorBoard; a metric with nothing to average over is None (JSON null)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from engine.rl.answer_extraction import split_think
from engine.rl.sample_buffer import effective_sample_ratio
from engine.rl.tokens import word_token_ids

DEFAULT_REASONING_WORDS = ("Wait", "Alternatively", "Hmm")
DEFAULT_HALLUCINATION_PHRASES = (
    "can't see the image", "cannot see the image", "can not see the image", "unable to see the image",
    "no image", "image is not provided", "image was not provided", "don't have access to the image",
)
ENTROPY_THRESHOLD = 6.8  # R1V3 §5: share of tokens with entropy above 6.8 nats tracked over training


def reasoning_word_token_ids(tokenizer: Any, words: Iterable[str] = DEFAULT_REASONING_WORDS) -> set[int]:
    """Ids the model emits when it starts one of `words`: every single-token variant (with/without leading
    space, case); a word with no single-token variant is represented by the first piece of its variants."""
    return word_token_ids(tokenizer, words, multi_token="auto")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - Σ softmax(z)·z over the vocabulary: [B, S, V] -> [B, S] (nats)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float | None:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else None


def critical_token_entropy(entropy: torch.Tensor, token_ids: torch.Tensor, loss_mask: torch.Tensor,
                           critical_ids: Iterable[int]) -> tuple[float | None, int]:
    """Mean entropy at response positions whose emitted token is in `critical_ids`, and their count.
    entropy[b, t] must be the entropy of the distribution that produced token_ids[b, t]."""
    ids = torch.tensor(sorted(set(critical_ids)), dtype=token_ids.dtype)
    at_critical = torch.isin(token_ids, ids) & loss_mask.bool()  # (B, S)
    return _masked_mean(entropy.float(), at_critical.float()), int(at_critical.sum())


def high_entropy_fraction(entropy: torch.Tensor, loss_mask: torch.Tensor, threshold: float = ENTROPY_THRESHOLD) -> float | None:
    """Share of response tokens with entropy > threshold."""
    return _masked_mean((entropy > threshold).float(), loss_mask.float())


def hallucination_rate(responses: Sequence[str], phrases: Iterable[str] = DEFAULT_HALLUCINATION_PHRASES) -> float | None:
    """Share of responses whose reasoning (the `<think>` part; the whole text without tags) contains a phrase."""
    if not responses:
        return None
    phrases = [p.lower() for p in phrases]
    hits = 0
    for text in responses:
        body = split_think(text)[0] if "<think>" in text or "</think>" in text else text
        body = body.lower().replace("\u2019", "'")  # curly apostrophe as typed by models
        hits += any(p in body for p in phrases)
    return hits / len(responses)


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    x = x.float()
    return float(x.mean()), float(x.std(unbiased=False))  # population std: a batch is the whole population


def rl_step_metrics(*, rewards: torch.Tensor, reward_components: dict[str, torch.Tensor] | None = None,
                    advantages: torch.Tensor | None = None, response_lengths: torch.Tensor | None = None,
                    entropy: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
                    loss_mask: torch.Tensor | None = None, critical_ids: Iterable[int] | None = None,
                    entropy_threshold: float = ENTROPY_THRESHOLD, responses: Sequence[str] | None = None,
                    hallucination_phrases: Iterable[str] = DEFAULT_HALLUCINATION_PHRASES,
                    ratio_with_buffer: float | None = None,
                    reward_counter: dict[str, int] | None = None) -> dict[str, float | int | None]:
    """One flat dict of the step's RL metrics; pass what you have, the rest is left out. (The loss's clip
    fractions, KL and ratio come from the GRPO loss reports: engine/train/grpo_loss.py.)"""
    out: dict[str, float | int | None] = {}
    out["reward_mean"], out["reward_std"] = _mean_std(rewards)
    for name, values in (reward_components or {}).items():
        if name == "accuracy":
            out["accuracy"] = float(values.float().mean())
        else:
            out[f"reward_{name}_mean"], out[f"reward_{name}_std"] = _mean_std(values)
    if advantages is not None:
        out["effective_sample_ratio"] = effective_sample_ratio(advantages)
    if ratio_with_buffer is not None:
        out["effective_sample_ratio_with_buffer"] = ratio_with_buffer
    if response_lengths is not None:
        out["response_length_mean"] = float(response_lengths.float().mean())
        out["response_length_max"] = float(response_lengths.max())
    if entropy is not None and loss_mask is not None:
        out["entropy_mean"] = _masked_mean(entropy.float(), loss_mask.float())
        out["high_entropy_frac"] = high_entropy_fraction(entropy, loss_mask, entropy_threshold)
        if token_ids is not None and critical_ids:
            out["critical_token_entropy"], out["critical_token_count"] = critical_token_entropy(
                entropy, token_ids, loss_mask, critical_ids)
    if responses is not None:
        out["hallucination_rate"] = hallucination_rate(responses, hallucination_phrases)
    for key, n in (reward_counter or {}).items():
        out[f"reward_skipped/{key}"] = int(n)
    return out


def best_checkpoint(records: Sequence[dict], by: str = "critical_token_entropy") -> int | None:
    """Step of the record with the highest `by` (R1V3 selects by critical-token entropy; or 'val_accuracy').
    Records are metrics lines with 'step'; lines without the metric (or with null) are skipped."""
    scored = [r for r in records if r.get(by) is not None and "step" in r]
    return max(scored, key=lambda r: (r[by], -r["step"]))["step"] if scored else None


def logprob_mismatch(train_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, float | None]:
    """How far the rollout engine's per-token log-probs are from the trainer's recomputation of the same
    tokens ([B, S] each): mean / max |Δ| and the k3 KL estimate KL(train || rollout) over response tokens."""
    mask = loss_mask.bool()
    if not bool(mask.any()):
        return {"logprob_diff_mean_abs": None, "logprob_diff_max_abs": None, "train_rollout_kl": None}
    diff = (train_logp.float() - rollout_logp.float())[mask]
    k3 = torch.exp(-diff) + diff - 1.0  # k3 with log_ratio = train - rollout
    return {"logprob_diff_mean_abs": float(diff.abs().mean()), "logprob_diff_max_abs": float(diff.abs().max()),
            "train_rollout_kl": float(k3.mean())}
