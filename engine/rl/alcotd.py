"""AL-CoTD data distillation (R1V §2.3), the pure parts: per-query scores -> repetition penalty, penalty
groups for the rollout engine, trace checks, SFT records and the summary. No megatron, no rollout engine.

Per query the data carries S_v (vision), S_t (text) and S_I (integration) scores; over all queries of
the file they are min-max scaled to [0, 1] and

    P = min(max_penalty, exp(α (1 − (Ŝ_v + β Ŝ_t + γ Ŝ_I) / (1 + β + γ))))        (R1V eq. 1, max_penalty 2)

(`engine.rl.decoding.alcotd_penalty`). Easy queries (low scores) get a high penalty and so short
reasoning; hard ones P near 1. The distiller (engine/distillation.py) generates k traces per query at
its P, keeps the correct ones as SFT rows and sets the wrong ones aside for revision (R1V has GPT-4o
revise them; we have no reviser, see `TraceStatus`).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch

from engine.data.errors import DataError
from engine.data.template import RESERVED_IN_TEXT, THINK_END
from engine.rl.decoding import alcotd_penalty

DEFAULT_SCORE_FIELDS = ("s_v", "s_t", "s_i")
DEFAULT_BUCKET_EDGES = (1.0, 1.25, 1.5, 1.75)  # four equal buckets over R1V's range P ∈ [1, 2]
TraceStatus = Literal["correct", "wrong", "unfinished", "malformed"]
# correct     the rule check accepts the final answer and the trace is a complete `reasoning</think>answer`
# wrong       complete, but the answer is wrong              -> the revision file (R1V: GPT-4o revises it)
# unfinished  hit max_tokens, or never closed `</think>`     -> the revision file
# malformed   contains a chat-template token (<|im_start|>, <IMG_CONTEXT>, ...): unusable as SFT text


# ---------------------------------------------------------------- scores -> penalty
@dataclass(frozen=True)
class AlcotdParams:
    alpha: float
    beta: float = 1.0
    gamma: float = 1.0
    max_penalty: float = 2.0  # R1V: min(2, ...)
    scale: bool = True        # min-max scale the scores over the file (R1V); False: they must lie in [0, 1]

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or self.gamma < 0:
            raise ValueError(f"AL-CoTD needs α, β, γ >= 0 (got α={self.alpha}, β={self.beta}, γ={self.gamma}); "
                             "a negative weight would give easy queries the lower penalty")
        if not self.max_penalty >= 1.0:
            raise ValueError(f"max_penalty={self.max_penalty} must be >= 1 (R1V: 2); 1 turns the penalty off")


def parse_scores(row: dict, fields: Sequence[str], where: str) -> tuple[float, float, float]:
    """(S_v, S_t, S_I) from a JSONL row; a missing or non-numeric score is a DataError naming file:line."""
    values = []
    for key in fields:
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            sid = row.get("id", "?")
            raise DataError("missing_score", f"sample {sid}: '{key}' must be a finite number, got {v!r}; add the "
                            f"score or name the field with --score-fields (now {' '.join(fields)})", where)
        values.append(float(v))
    return values[0], values[1], values[2]


def query_penalties(scores: torch.Tensor, params: AlcotdParams, wheres: Sequence[str] = ()) -> torch.Tensor:
    """scores [N, 3] (S_v, S_t, S_I) -> P [N] float64. With scale=False the scores must already be in [0, 1]."""
    if scores.dim() != 2 or scores.shape[1] != 3:
        raise ValueError(f"scores must be [N, 3] (S_v, S_t, S_I), got {tuple(scores.shape)}")
    if not params.scale:
        bad = ((scores < 0) | (scores > 1)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            where = wheres[bad[0]] if wheres else f"query {bad[0]}"
            raise DataError("score_range", f"{len(bad)} queries have scores outside [0, 1] "
                            f"(first {scores[bad[0]].tolist()}); scores given unscaled must be in [0, 1], "
                            "or drop --no-scale to min-max scale them", where)
    s = scores.double()
    return alcotd_penalty(s[:, 0], s[:, 1], s[:, 2], alpha=params.alpha, beta=params.beta, gamma=params.gamma,
                          scale=params.scale, max_penalty=params.max_penalty).double()


def quantize_penalty(p: float, step: float) -> float:
    """P rounded to a multiple of `step` (0: unchanged), so queries share generate calls; never below 1."""
    if step <= 0:
        return float(p)
    return max(1.0, round(round(p / step) * step, 10))  # the outer round drops float noise (1.1500000000000001)


def group_by_penalty(penalties: Iterable[float], step: float) -> dict[float, list[int]]:
    """{applied penalty: [query indices]} ordered by penalty, indices in input order within a group."""
    groups: dict[float, list[int]] = defaultdict(list)
    for i, p in enumerate(penalties):
        groups[quantize_penalty(float(p), step)].append(i)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------- traces
def repeat_fraction(token_ids: Sequence[int]) -> float:
    """Share of tokens that already occurred earlier in the response: 1 − distinct / length (0 for empty)."""
    return 1.0 - len(set(token_ids)) / len(token_ids) if token_ids else 0.0


def trace_status(text: str, finish_reason: str, correct: bool) -> TraceStatus:
    """`text` is the response after the prompt's `<think>\\n`, without the stop token."""
    if any(t in text for t in RESERVED_IN_TEXT):
        return "malformed"
    if finish_reason != "stop" or THINK_END not in text:
        return "unfinished"
    return "correct" if correct else "wrong"


@dataclass
class Trace:
    """One generated response of a query."""
    sample: int                # 0..k-1
    text: str                  # after the prompt's '<think>\n', stop token removed
    length: int                # generated tokens, stop token excluded
    repeat_fraction: float
    status: TraceStatus


@dataclass
class Query:
    """A scored RL-format row and what was generated for it."""
    index: int                 # row position among the file's non-empty lines
    where: str                 # file:line
    row: dict                  # the JSON object as read
    scores: tuple[float, float, float]
    penalty: float = math.nan  # the formula's P
    applied_penalty: float = math.nan  # what the engine got (quantized P)
    traces: list[Trace] = field(default_factory=list)


def kept_traces(query: Query, per_query: int) -> list[Trace]:
    """The first `per_query` correct traces, one per distinct text (greedy k > 1 repeats itself)."""
    kept, seen = [], set()
    for t in query.traces:
        if t.status == "correct" and t.text not in seen:
            kept.append(t)
            seen.add(t.text)
            if len(kept) == per_query:
                break
    return kept


# ---------------------------------------------------------------- records
REWRITTEN = ("id", "image", "images", "prompt", "answer", "type", "conversations")


def _image_field(row: dict, src_dir: Path, out_dir: Path):
    """The row's image path(s), rewritten relative to the output file's directory."""
    raw = row.get("image", row.get("images"))
    if raw is None:
        return None
    paths = [raw] if isinstance(raw, str) else list(raw)
    rel = [os.path.relpath(os.path.abspath(src_dir / p), os.path.abspath(out_dir)) for p in paths]
    return rel[0] if isinstance(raw, str) else rel


def _meta(q: Query, fields: Sequence[str], scaled: tuple[float, float, float] | None) -> dict:
    meta = {"penalty": q.penalty, "applied_penalty": q.applied_penalty,
            "scores": dict(zip(fields, q.scores)), "gold": str(q.row.get("answer")), "source": q.where}
    if scaled is not None:
        meta["scaled_scores"] = dict(zip(fields, scaled))
    return meta


def sft_record(q: Query, trace: Trace, src_dir: Path, out_dir: Path, fields: Sequence[str], multiple: bool,
               scaled: tuple[float, float, float] | None = None) -> dict:
    """A kept trace as an SFT `conversations` row (engine/data/formats.py), the row's other fields kept
    (e.g. rm_score for iterative SFT), plus `alcotd` metadata."""
    rec = {"id": f"{q.row.get('id', q.where)}#{trace.sample}" if multiple else q.row.get("id", q.where)}
    image = _image_field(q.row, src_dir, out_dir)
    if image is not None:
        rec["image"] = image
    rec.update({k: v for k, v in q.row.items() if k not in REWRITTEN})
    rec["conversations"] = [{"from": "human", "value": q.row["prompt"]},
                            {"from": "gpt", "value": "<think>\n" + trace.text}]
    rec["alcotd"] = {**_meta(q, fields, scaled), "correct": True, "sample": trace.sample,
                     "response_tokens": trace.length, "repeat_fraction": trace.repeat_fraction}
    return rec


def revision_record(q: Query, src_dir: Path, out_dir: Path, fields: Sequence[str],
                    scaled: tuple[float, float, float] | None = None) -> dict:
    """A query with no correct trace, in RL-prompt format (so it can be re-run or revised) + its traces."""
    rec = {"id": q.row.get("id", q.where)}
    image = _image_field(q.row, src_dir, out_dir)
    if image is not None:
        rec["image"] = image
    rec.update({k: v for k, v in q.row.items() if k not in ("id", "image", "images")})
    rec["alcotd"] = {**_meta(q, fields, scaled), "correct": False, "needs_revision": True,
                     "traces": [{"sample": t.sample, "status": t.status, "response_tokens": t.length,
                                 "repeat_fraction": t.repeat_fraction, "text": "<think>\n" + t.text}
                                for t in q.traces]}
    return rec


# ---------------------------------------------------------------- summary
def bucket_label(p: float, edges: Sequence[float]) -> str:
    """'[lo,hi)' of the bucket holding p; the last bucket is '[lo,inf)'. edges ascending, p >= edges[0]."""
    k = max(i for i, e in enumerate(edges) if p >= e - 1e-12) if p >= edges[0] - 1e-12 else 0
    hi = f"{edges[k + 1]:.2f}" if k + 1 < len(edges) else "inf"
    return f"[{edges[k]:.2f},{hi})"


def summarize(queries: Sequence[Query], per_query: int, edges: Sequence[float] = DEFAULT_BUCKET_EDGES) -> dict:
    """Counts over traces and queries, and per penalty bucket (by the formula's P): queries, traces, mean
    response length, accuracy (status correct), mean repeat fraction."""
    if list(edges) != sorted(edges) or not edges:
        raise ValueError(f"bucket edges must be ascending and non-empty, got {list(edges)}")
    statuses = defaultdict(int)
    buckets: dict[str, dict] = {}
    for q in queries:
        b = buckets.setdefault(bucket_label(q.penalty, edges),
                               {"queries": 0, "traces": 0, "_len": 0.0, "_correct": 0, "_rep": 0.0, "kept_rows": 0})
        b["queries"] += 1
        b["kept_rows"] += len(kept_traces(q, per_query))
        for t in q.traces:
            statuses[t.status] += 1
            b["traces"] += 1
            b["_len"] += t.length
            b["_correct"] += t.status == "correct"
            b["_rep"] += t.repeat_fraction
    by_bucket = {}
    for label in sorted(buckets, key=lambda s: float(s[1:].split(",")[0])):
        b = buckets[label]
        n = b["traces"]
        by_bucket[label] = {"queries": b["queries"], "traces": n, "kept_rows": b["kept_rows"],
                            "mean_length": b["_len"] / n if n else None,
                            "accuracy": b["_correct"] / n if n else None,
                            "mean_repeat_fraction": b["_rep"] / n if n else None}
    kept = [len(kept_traces(q, per_query)) for q in queries]
    pen = [q.penalty for q in queries]
    return {
        "queries": len(queries),
        "queries_kept": sum(1 for k in kept if k),
        "queries_needing_revision": sum(1 for k in kept if not k),
        "rows_written": sum(kept),
        "traces": {s: statuses.get(s, 0) for s in ("correct", "wrong", "unfinished", "malformed")},
        "penalty": {"min": min(pen), "max": max(pen), "mean": sum(pen) / len(pen)} if pen else None,
        "by_penalty_bucket": by_bucket,
    }
