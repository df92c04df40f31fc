"""R1V2 Selective Sample Buffer (SSB): keep samples with non-zero advantage, re-introduce them into
later updates drawn with probability ∝ |A|; plus the offline prompt-pool filter.

Buffered samples are off-policy when re-used: the trainer recomputes their old log-probs with the
current weights (as it does for fresh ones), so only the advantage is carried from the past.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch


def effective_sample_ratio(advantages: torch.Tensor, atol: float = 0.0) -> float:
    """Share of samples with |A| > atol (the samples that carry gradient)."""
    if advantages.numel() == 0:
        return 0.0
    return float((advantages.abs() > atol).float().mean())


@dataclass
class BufferedSample:
    sample_id: Hashable
    advantage: float
    step: int          # training step at which it was added
    payload: Any = None  # tokens, masks, ... whatever the trainer re-uses (must be picklable for checkpoints)


@dataclass
class MixPlan:
    """How an update batch is assembled: fresh samples kept (indices into the fresh batch) + buffered ones."""
    keep_fresh: torch.Tensor        # [n_keep] long
    buffered: list[BufferedSample]
    ratio_without_buffer: float     # effective-sample ratio of the fresh batch alone
    ratio_with_buffer: float        # effective-sample ratio of the mixed batch


class SelectiveSampleBuffer:
    """Capacity-bounded, age-bounded store of samples with |A| > min_abs_advantage.

    When full, the oldest entries are evicted first (FIFO). A sample whose id is already stored is
    replaced by the newer one. Drawing is without replacement within a call, weights ∝ |A|,
    from a seeded torch.Generator whose state is part of state_dict().
    """

    def __init__(self, capacity: int, max_age: int, seed: int = 0, min_abs_advantage: float = 0.0):
        if capacity < 1 or max_age < 0:
            raise ValueError(f"SSB needs capacity >= 1 and max_age >= 0 (got {capacity}, {max_age})")
        self.capacity, self.max_age, self.min_abs_advantage = capacity, max_age, min_abs_advantage
        self.entries: deque[BufferedSample] = deque()
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, sample_ids: Sequence[Hashable], advantages: torch.Tensor, step: int,
            payloads: Sequence[Any] | None = None) -> int:
        """Store the samples with |A| > min_abs_advantage; returns how many were stored."""
        if len(sample_ids) != advantages.numel() or (payloads is not None and len(payloads) != len(sample_ids)):
            raise ValueError(f"SSB.add: {len(sample_ids)} ids, {advantages.numel()} advantages, "
                             f"{None if payloads is None else len(payloads)} payloads — they must match")
        new = {}
        for i, (sid, a) in enumerate(zip(sample_ids, advantages.tolist())):
            if abs(a) > self.min_abs_advantage:
                new[sid] = BufferedSample(sid, float(a), step, None if payloads is None else payloads[i])
        if new:
            self.entries = deque(e for e in self.entries if e.sample_id not in new)
            self.entries.extend(new.values())
        while len(self.entries) > self.capacity:
            self.entries.popleft()
        return len(new)

    def expire(self, step: int) -> int:
        """Drop entries older than max_age steps; returns how many."""
        before = len(self.entries)
        self.entries = deque(e for e in self.entries if step - e.step <= self.max_age)
        return before - len(self.entries)

    def probabilities(self) -> torch.Tensor:
        """Draw probabilities [len(self)], ∝ |A|."""
        w = torch.tensor([abs(e.advantage) for e in self.entries], dtype=torch.float64)
        return w / w.sum() if len(w) else w

    def draw(self, n: int, step: int, consume: bool = False) -> list[BufferedSample]:
        """Up to n distinct samples, ∝ |A| (after expiring old ones); consume=True removes them."""
        self.expire(step)
        n = min(n, len(self.entries))
        if n <= 0:
            return []
        idx = torch.multinomial(self.probabilities(), n, replacement=False, generator=self.generator).tolist()
        drawn = [self.entries[i] for i in idx]
        if consume:
            taken = set(idx)
            self.entries = deque(e for i, e in enumerate(self.entries) if i not in taken)
        return drawn

    def mix(self, fresh_advantages: torch.Tensor, step: int, max_fraction: float = 1.0) -> MixPlan:
        """Replace zero-advantage fresh samples with buffered ones (batch size unchanged).

        At most floor(max_fraction * N) slots are replaced; fresh samples with |A| > 0 are always kept.
        """
        n = fresh_advantages.numel()
        effective = fresh_advantages.abs() > self.min_abs_advantage
        zero_idx = (~effective).nonzero().flatten()
        n_draw = min(len(zero_idx), int(max_fraction * n))
        buffered = self.draw(n_draw, step)
        replaced = zero_idx[: len(buffered)]
        keep = torch.ones(n, dtype=torch.bool)
        keep[replaced] = False
        keep_idx = keep.nonzero().flatten()
        n_eff_mixed = int(effective[keep_idx].sum()) + len(buffered)
        return MixPlan(
            keep_fresh=keep_idx,
            buffered=buffered,
            ratio_without_buffer=effective_sample_ratio(fresh_advantages, self.min_abs_advantage),
            ratio_with_buffer=n_eff_mixed / max(n, 1),
        )

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity, "max_age": self.max_age, "min_abs_advantage": self.min_abs_advantage,
            "entries": [(e.sample_id, e.advantage, e.step, e.payload) for e in self.entries],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("capacity", "max_age", "min_abs_advantage"):
            if state[key] != getattr(self, key):
                raise ValueError(f"SSB checkpoint has {key}={state[key]} but the config says {getattr(self, key)}; "
                                 "resume with the same algorithm.ssb settings")
        self.entries = deque(BufferedSample(*e) for e in state["entries"])
        self.generator.set_state(state["generator"])


class PromptPoolFilter:
    """SSB offline mode: drop prompts whose last `window` groups all had zero advantage
    (every sample right, or every sample wrong) before spending rollouts on them."""

    def __init__(self, window: int = 1, atol: float = 0.0):
        if window < 1:
            raise ValueError(f"PromptPoolFilter window must be >= 1, got {window}")
        self.window, self.atol = window, atol
        self.history: dict[Hashable, deque[bool]] = {}  # prompt id -> recent "group had signal" flags

    def record(self, prompt_id: Hashable, group_advantages: torch.Tensor) -> None:
        flags = self.history.setdefault(prompt_id, deque(maxlen=self.window))
        flags.append(bool((group_advantages.abs() > self.atol).any()))

    def is_exhausted(self, prompt_id: Hashable) -> bool:
        flags = self.history.get(prompt_id)
        return flags is not None and len(flags) == self.window and not any(flags)

    def filter(self, prompt_ids: Sequence[Hashable]) -> tuple[list[Hashable], list[Hashable]]:
        """(kept, dropped) prompt ids, order preserved."""
        kept = [p for p in prompt_ids if not self.is_exhausted(p)]
        dropped = [p for p in prompt_ids if self.is_exhausted(p)]
        return kept, dropped

    def state_dict(self) -> dict:
        return {"window": self.window, "atol": self.atol, "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.atol = state["window"], state["atol"]
        self.history = {k: deque(v, maxlen=self.window) for k, v in state["history"].items()}
