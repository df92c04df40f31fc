"""AL-CoTD distillation (R1V §2.3): k reasoning traces per scored query, each query generated at its own
repetition penalty P (engine.rl.alcotd), final answers checked by the rule reward; correct traces become
SFT rows, queries without one go to a revision file.

The rollout engine takes one SamplingParams per generate call, so queries are grouped by P (rounded to
`penalty_step`, default 0.01) and each group is generated in chunks of `batch_size` prompts with that
group's `repetition_penalty`. Under torchrun every DP rank generates its own share of the queries
(query j on DP rank j % dp_size); global rank 0 gathers them and writes the files in input order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from engine.rl.alcotd import (
    DEFAULT_BUCKET_EDGES, DEFAULT_SCORE_FIELDS, AlcotdParams, Query, Trace, group_by_penalty, kept_traces,
    parse_scores, query_penalties, repeat_fraction, revision_record, sft_record, summarize, trace_status,
)


@dataclass
class DistillOptions:
    data: str                       # RL-format JSONL with per-query scores
    out: str                        # SFT-format JSONL written here
    params: AlcotdParams
    revise_out: str = ""             # queries without a correct trace ("" = <out>.revise.jsonl)
    summary_out: str = ""           # "" = <out>.summary.json
    score_fields: tuple[str, str, str] = DEFAULT_SCORE_FIELDS
    k: int = 4                      # traces per query
    per_query: int = 1              # correct traces kept per query (distinct texts)
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 1024
    penalty_step: float = 0.01
    batch_size: int = 32            # prompts per generate call
    on_error: str = "raise"         # bad row (missing score, bad image, too long): raise with file:line, or skip
    seed: int = 1234
    limit: int | None = None        # only the first `limit` rows of the file
    bucket_edges: tuple[float, ...] = DEFAULT_BUCKET_EDGES
    log: bool = True

    def __post_init__(self):
        if self.k < 1 or self.per_query < 1 or self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError("k, per_query, max_tokens and batch_size must be >= 1")
        if self.temperature == 0 and self.k > 1:
            raise ValueError(f"temperature 0 (greedy) gives k={self.k} identical traces (and vLLM refuses n > 1 "
                             "when greedy); use k=1 or a temperature > 0")
        if self.temperature < 0 or self.penalty_step < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("temperature and penalty_step must be >= 0, limit >= 1")
        if not self.bucket_edges or list(self.bucket_edges) != sorted(self.bucket_edges):
            raise ValueError(f"bucket edges must be ascending and non-empty, got {list(self.bucket_edges)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={self.on_error!r}: use raise or skip")
        if len(self.score_fields) != 3:
            raise ValueError(f"score_fields must name S_v, S_t, S_I, got {self.score_fields}")
        out = Path(self.out)
        self.revise_out = self.revise_out or str(out.with_suffix(".revise.jsonl"))
        self.summary_out = self.summary_out or str(out.with_suffix(".summary.json"))
        paths = [Path(p).resolve() for p in (self.data, self.out, self.revise_out, self.summary_out)]
        if len(set(paths)) != 4:
            raise ValueError(f"input, output, revision and summary files must differ, got {[str(p) for p in paths]}")


@dataclass
class LoadedQueries:
    queries: list[Query]
    planned: list            # PlannedSample per query (prompt ids, image paths and tile counts)
    ctx: object              # engine.data.loader.DataContext (tokenizer, image pipeline)
    skipped: dict[str, int] = field(default_factory=dict)
    rows: int = 0


def load_queries(cfg, opts: DistillOptions) -> LoadedQueries:
    """Read + validate every row (scores, template, image headers) and compute P over the usable ones.
    Every rank does this (cheap: no pixels are decoded)."""
    from engine.data.errors import DataError, SkipCounter, handle
    from engine.data.loader import build_data_context

    ctx = build_data_context(cfg, opts.data, fmt="rl")
    index = ctx.planner.source.index
    n_rows = len(index) if opts.limit is None else min(opts.limit, len(index))
    skips = SkipCounter()
    queries, planned = [], []
    for i in range(n_rows):
        where = index.where(i)
        try:
            row = index.read(i)
            scores = parse_scores(row, opts.score_fields, where)
            plan = ctx.planner.plan(i)
        except DataError as e:
            handle(e, opts.on_error, skips)
            continue
        queries.append(Query(i, where, row, scores))
        planned.append(plan)
    if queries:
        scores = torch.tensor([q.scores for q in queries], dtype=torch.float64)  # [N, 3]
        penalties = query_penalties(scores, opts.params, [q.where for q in queries])
        for q, p in zip(queries, penalties.tolist()):
            q.penalty = p
    return LoadedQueries(queries, planned, ctx, skips.summary(), n_rows)


def scaled_scores(queries: list[Query], scale: bool) -> list[tuple[float, float, float]] | None:
    from engine.rl.decoding import minmax_scale

    if not scale or not queries:
        return None
    s = torch.tensor([q.scores for q in queries], dtype=torch.float64)
    cols = [minmax_scale(s[:, c]) for c in range(3)]
    return [tuple(float(c[j]) for c in cols) for j in range(len(queries))]


def _say(opts: DistillOptions, msg: str) -> None:
    if opts.log and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"[alcotd] {msg}", file=sys.stderr, flush=True)


def _tiles(plan, image_pipeline) -> torch.Tensor:
    """A planned sample's images through our pipeline: (n_tiles, 3, T, T)."""
    from engine.data.dataset import load_images

    return load_images(plan, image_pipeline).pixel_values


def generate_traces(engine, tok, queries: list[Query], planned: list, opts: DistillOptions,
                    image_pipeline, reward, seed: int) -> None:
    """Fill q.applied_penalty and q.traces for `queries` (this rank's share)."""
    from engine.rl.rewards import RewardSample
    from engine.rollout.base import GenerationRequest, ImageInputs, SamplingParams, stop_token_ids

    stop = stop_token_ids(tok)
    groups = group_by_penalty([q.penalty for q in queries], opts.penalty_step)
    calls = 0
    for penalty, members in groups.items():
        t0 = time.perf_counter()
        for start in range(0, len(members), opts.batch_size):
            chunk = members[start : start + opts.batch_size]
            requests = []
            for j in chunk:
                q, plan = queries[j], planned[j]
                q.applied_penalty = penalty
                images = None
                if plan.images:  # the files, and our tiles decoded only if the engine takes tiles (native)
                    images = ImageInputs([str(p) for p in plan.images], partial(_tiles, plan, image_pipeline))
                requests.append(GenerationRequest(plan.tokens.tolist(), images=images, request_id=plan.id))
            params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, max_tokens=opts.max_tokens,
                                    n=opts.k, stop_token_ids=stop, repetition_penalty=penalty, seed=seed + calls)
            calls += 1
            results = engine.generate(requests, params)
            texts, golds, owners = [], [], []
            for j, res in zip(chunk, results):
                for s, comp in enumerate(res.completions):
                    ids = list(comp.token_ids)
                    if ids and ids[-1] in stop:
                        ids = ids[:-1]
                    text = tok.decode(ids, skip_special_tokens=False)
                    texts.append(text)
                    golds.append(planned[j].answer)
                    owners.append((j, s, ids, comp.finish_reason))
            correct = reward([RewardSample("", t, g) for t, g in zip(texts, golds)]).total.tolist()
            for (j, s, ids, finish), text, ok in zip(owners, texts, correct):
                queries[j].traces.append(Trace(s, text, len(ids), repeat_fraction(ids),
                                               trace_status(text, finish, ok > 0)))
        n_ok = sum(t.status == "correct" for j in members for t in queries[j].traces)
        _say(opts, f"P={penalty:.3f}: {len(members)} queries x k={opts.k}, {n_ok} correct traces "
                   f"({time.perf_counter() - t0:.1f} s)")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_outputs(queries: list[Query], loaded: LoadedQueries, opts: DistillOptions, extra: dict) -> dict:
    src_dir, out = Path(opts.data).parent, Path(opts.out)
    fields = opts.score_fields
    scaled = scaled_scores(queries, opts.params.scale) or [None] * len(queries)
    sft, revise = [], []
    for q, sc in zip(queries, scaled):
        kept = kept_traces(q, opts.per_query)
        if kept:
            sft += [sft_record(q, t, src_dir, out.parent, fields, opts.per_query > 1, sc) for t in kept]
        else:
            revise.append(revision_record(q, src_dir, Path(opts.revise_out).parent, fields, sc))
    _write_jsonl(out, sft)
    _write_jsonl(Path(opts.revise_out), revise)
    summary = {
        "data": opts.data, "out": opts.out, "revise_out": opts.revise_out, **extra,
        "alpha": opts.params.alpha, "beta": opts.params.beta, "gamma": opts.params.gamma,
        "max_penalty": opts.params.max_penalty, "scale": opts.params.scale, "penalty_step": opts.penalty_step,
        "k": opts.k, "per_query": opts.per_query, "temperature": opts.temperature, "max_tokens": opts.max_tokens,
        "rows_read": loaded.rows, "skipped": loaded.skipped, "skipped_total": sum(loaded.skipped.values()),
        **summarize(queries, opts.per_query, opts.bucket_edges),
        "revise_rows": len(revise),
    }
    Path(opts.summary_out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.summary_out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def distill(cfg, model, pg, opts: DistillOptions, extra: dict | None = None,
            loaded: LoadedQueries | None = None) -> dict | None:
    """Collective over the world. Returns the summary on global rank 0, None elsewhere. `loaded`: the
    result of load_queries(cfg, opts) if the caller already has it."""
    from engine.rl.math_check import MathVerifier
    from engine.rl.rewards import build_reward
    from engine.rollout.factory import build_rollout_engine

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="rl", packing=False, thinking="think"))
    loaded = loaded or load_queries(cfg, opts)
    ctx = loaded.ctx
    if loaded.skipped:
        _say(opts, f"skipped rows: {loaded.skipped}")
    if not loaded.queries:
        raise ValueError(f"{opts.data}: no usable query among {loaded.rows} rows (skipped: {loaded.skipped}); "
                         "nothing to distill")
    dp_rank, dp_size = dist.get_rank(pg.dp), dist.get_world_size(pg.dp)
    mine = [j for j in range(len(loaded.queries)) if j % dp_size == dp_rank]
    queries = [loaded.queries[j] for j in mine]
    planned = [loaded.planned[j] for j in mine]
    tok = ctx.tokenizer.hf
    engine = build_rollout_engine(cfg, model, pg, tokenizer=tok, tokenizer_dir=cfg.data.tokenizer_path)
    r = cfg.algorithm.reward
    with MathVerifier(r.math_verify_timeout_s, r.math_verify_workers, r.math_verify_backend) as verifier:
        reward = build_reward("rule", math_verifier=verifier)
        generate_traces(engine, tok, queries, planned, opts, ctx.make_pipeline(), reward,
                        opts.seed + 100_003 * dp_rank)
    engine.close()
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, queries, group=pg.dp)
    if dist.get_rank() != 0:
        return None
    everything = sorted((q for part in gathered for q in part), key=lambda q: q.index)
    return write_outputs(everything, loaded, opts, {"backend": cfg.rollout.backend, **(extra or {})})
