"""R1V iterative SFT data selection (R1V §2.4): at iteration t train M_t on D_rm(τ_t) ∪ E_{t-1}, where
D_rm(τ) = {samples with reward-model score >= τ} (scores 0-5) and E_{t-1} = samples M_{t-1} answered wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

DEFAULT_TAU_SCHEDULE = (2.0, 3.0, 4.0, 5.0)  # R1V: τ = 2, 3, 4, 5 for t = 1..4


def tau_for_iteration(schedule: Sequence[float], t: int) -> float:
    """τ_t for iteration t (1-based)."""
    if not 1 <= t <= len(schedule):
        raise ValueError(f"iteration t={t} is outside the τ schedule {list(schedule)} (t runs 1..{len(schedule)}); "
                         "extend algorithm.iterative_sft.tau_schedule")
    return float(schedule[t - 1])


@dataclass
class IterationSelection:
    ids: list[Hashable]      # D_rm ∪ E_{t-1}, in the order of the score table, then wrong-only ids
    tau: float
    num_rm: int              # |D_rm(τ)|
    num_wrong: int           # |E_{t-1}|
    num_overlap: int         # |D_rm ∩ E_{t-1}|
    num_total: int           # |D_rm ∪ E_{t-1}|
    num_pool: int            # samples scored


def select_iteration(rm_scores: Mapping[Hashable, float], previous_wrong: set[Hashable] | Sequence[Hashable],
                     tau: float) -> IterationSelection:
    """D_rm(τ) ∪ E_{t-1} over sample ids. An id in E_{t-1} without a score is an error (it is not in the pool)."""
    wrong = set(previous_wrong)
    unknown = wrong - set(rm_scores)
    if unknown:
        raise ValueError(f"{len(unknown)} wrongly-answered sample ids are not in the scored pool, e.g. "
                         f"{sorted(map(str, unknown))[:3]}; E_(t-1) must come from the same data set")
    d_rm = [sid for sid, score in rm_scores.items() if score >= tau]
    d_rm_set = set(d_rm)
    extra = [sid for sid in rm_scores if sid in wrong and sid not in d_rm_set]
    return IterationSelection(
        ids=d_rm + extra, tau=tau, num_rm=len(d_rm), num_wrong=len(wrong),
        num_overlap=len(d_rm_set & wrong), num_total=len(d_rm) + len(extra), num_pool=len(rm_scores),
    )


def wrong_sample_ids(ids: Sequence[Hashable], correct: Sequence[float | bool]) -> set[Hashable]:
    """E_{t-1} from per-sample correctness (e.g. the rule reward of M_{t-1}'s greedy answers)."""
    if len(ids) != len(correct):
        raise ValueError(f"{len(ids)} ids but {len(correct)} correctness values")
    return {sid for sid, ok in zip(ids, correct) if not ok}


def plan_iterations(rm_scores: Mapping[Hashable, float], schedule: Sequence[float],
                    answer_wrong: Callable[[int], set[Hashable]]) -> list[IterationSelection]:
    """All T selections; answer_wrong(t) returns E_t (the ids model M_t gets wrong), E_0 = answer_wrong(0)."""
    return [select_iteration(rm_scores, answer_wrong(t - 1), tau_for_iteration(schedule, t))
            for t in range(1, len(schedule) + 1)]
