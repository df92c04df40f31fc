"""Config -> an endless, resumable iterator of micro-batch dicts (see batch.py for the contract).

Main process: the sampler gives this DP rank's indices, a window of `data.pack_window` of them is
planned (parse, validate, template, image headers) and packed first-fit-decreasing into rows of
`train.seq_length`; rows are grouped into micro-batches. Workers (DataLoader, `data.num_workers`)
decode and tile the images and collate. The state after each yielded micro-batch is
(sampler state at the window's start, micro-batches done in the window): the window is re-planned
identically on resume, so the next micro-batch is exactly the one that would have come.

Skipped samples (data.on_error=skip) are counted when the micro-batch they would have been in is
returned: samples dropped while planning a window count with its first micro-batch, samples whose images
fail to decode with their own. So `skips` is exact at every position, also after a resume mid-window.
An epoch of this rank's shard in which no sample could be used (planned or decoded) is an error naming
the file.

Notes: the last micro-batch of a window is filled up with empty rows (all padding, loss_mask 0) so
every micro-batch has the same shape. DP ranks pack their own shards, so they may reach epoch ends at
different steps; the iterator never ends.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.data.batch import collate_preference, collate_rl, collate_sft, pack_preference_pairs
from engine.data.dataset import Failed, ImageLoadingDataset, LoadedSample, PlannedSample, Planner
from engine.data.errors import DataError, SkipCounter, handle
from engine.data.formats import SampleSource
from engine.data.images import TileSpec, build_image_pipeline
from engine.data.packing import pack_rows
from engine.data.sampler import ShardedSampler
from engine.data.template import ChatTemplate, ChatTokenizer

log = logging.getLogger(__name__)


@dataclass
class DataContext:
    """Everything built from the config that turns a JSONL file into tokens and tiles."""

    tokenizer: ChatTokenizer
    template: ChatTemplate
    spec: TileSpec
    planner: Planner
    seq_length: int
    tokens_per_tile: int
    image_token_id: int
    image_pipeline: str
    dali_device: str
    on_error: str
    filtered: dict[str, int] = field(default_factory=dict)  # samples left out by policy, by reason (whole file)
    path: str = ""  # the JSONL file, for messages

    def make_pipeline(self):
        return build_image_pipeline(self.image_pipeline, self.spec, self.dali_device)


def tile_spec(data_cfg) -> TileSpec:
    return TileSpec(data_cfg.tile_size, data_cfg.min_tiles, data_cfg.max_tiles, data_cfg.thumbnail,
                    data_cfg.max_image_pixels)


def build_data_context(cfg, path: str | Path | None = None, fmt: str | None = None,
                       check_model: bool = True) -> DataContext:
    """`cfg` is the root Config. `path`/`fmt` default to data.train_path / data.format. check_model=False
    (inspection tools) skips the tokenizer-vs-model checks (image token id, vocabulary size)."""
    d = cfg.data
    path = path or d.train_path
    if not path:
        raise ValueError("no data file: set data.train_path (a JSONL file, see docs/data.md)")
    tok = ChatTokenizer(d.tokenizer_path)
    if check_model and tok.image_token_id != cfg.model.image_token_id:
        raise ValueError(
            f"tokenizer {d.tokenizer_path} has <IMG_CONTEXT> = {tok.image_token_id} but model.image_token_id = "
            f"{cfg.model.image_token_id}; set model.image_token_id={tok.image_token_id}"
        )
    if check_model and tok.vocab_size > cfg.model.llm.vocab_size:
        raise ValueError(f"tokenizer {d.tokenizer_path} has {tok.vocab_size} tokens > model.llm.vocab_size="
                         f"{cfg.model.llm.vocab_size}; raise model.llm.vocab_size")
    template = ChatTemplate(tok, cfg.model.tokens_per_tile, d.thinking, d.system_prompt)
    spec = tile_spec(d)
    max_samples = d.max_samples if d.train_path and Path(path) == Path(d.train_path) else 0  # never cut validation
    source = SampleSource(path, fmt or d.format, max_samples)
    filtered = {}
    gap = cfg.algorithm.mpo.pair_reward_gap
    if source.fmt == "preference" and gap > 0:
        keep = source.pairs_with_reward_gap(gap)
        filtered["below_pair_reward_gap"] = len(source) - len(keep)
        if not keep:
            raise DataError("no_samples", f"no preference pair in {path} has chosen_score - rejected_score >= {gap}; "
                                          "lower algorithm.mpo.pair_reward_gap")
        if filtered["below_pair_reward_gap"]:
            log.warning("%d of %d preference pairs in %s have chosen_score - rejected_score < %s: not used "
                        "(algorithm.mpo.pair_reward_gap)", filtered["below_pair_reward_gap"], len(source), path, gap)
        source.keep_only(keep)
    planner = Planner(source, template, spec, cfg.train.seq_length, tok.image_token_id, d.truncate)
    return DataContext(tok, template, spec, planner, cfg.train.seq_length, cfg.model.tokens_per_tile,
                       tok.image_token_id, d.image_pipeline, d.dali_device, d.on_error, filtered, str(path))


@dataclass
class _Marker:
    """Last element of every planned micro-batch: its shape, the iterator state after it, and the samples
    dropped while planning that are counted with it (by reason)."""

    num_rows: int
    state: dict
    plan_skips: dict = field(default_factory=dict)
    layout: list | None = None  # packed preference: the micro-batch's PairLayout (batch.collate_preference)


class MicroBatchPlans:
    """The DataLoader's batch_sampler: yields lists of PlannedSample (+ a _Marker)."""

    def __init__(self, ctx: DataContext, sampler: ShardedSampler, rows_per_batch: int, packing: bool,
                 pack_window: int, pair_packing: bool = False):
        self.ctx, self.sampler = ctx, sampler
        self.rows_per_batch, self.packing, self.pack_window = rows_per_batch, packing, pack_window
        self.pair_packing = pair_packing  # preference pairs packed into 2 x rows_per_batch rows
        self.planned_skips = SkipCounter()  # every sample dropped while planning (logs the first of each reason)
        self.pending = Counter()  # dropped while planning, not yet counted with a returned micro-batch
        self.done_in_window = 0  # micro-batches of the window at the sampler's state already consumed

    def _plan_window(self, indices) -> list[PlannedSample]:
        plans = []
        for i in indices:
            try:
                plans.append(self.ctx.planner.plan(int(i)))
            except DataError as e:
                handle(e, self.ctx.on_error, self.planned_skips)
                self.pending[e.reason] += 1
        return plans

    def _rows(self, plans: list[PlannedSample]) -> list[list[PlannedSample]]:
        if not self.packing:
            return [[p] for p in plans]
        rows = pack_rows([len(p) for p in plans], self.ctx.seq_length)
        return [[plans[k] for k in row] for row in rows]

    def __iter__(self):
        usable_in_epoch = 0
        while True:
            window_state = self.sampler.state_dict()
            indices, epoch = self.sampler.take(self.pack_window)
            plans = self._plan_window(indices)
            usable_in_epoch += len(plans)
            if self.sampler.epoch != epoch:  # that window ended the epoch
                if usable_in_epoch == 0:
                    raise DataError("no_valid_samples", f"every sample of this rank's shard of {self.ctx.path} in "
                                    f"epoch {epoch} was skipped ({self.planned_skips.summary()}); fix the data "
                                    "(tools/inspect_data.py shows why)")
                usable_in_epoch = 0
            layouts = None
            if self.pair_packing:
                groups, layouts = pack_preference_pairs([(len(p), len(p.rejected.tokens)) for p in plans],
                                                        2 * self.rows_per_batch, self.ctx.seq_length)
                batches = [[[plans[i]] for i in group] for group in groups]  # one "row" per pair, as unpacked
            else:
                rows = self._rows(plans)
                batches = [rows[s : s + self.rows_per_batch] for s in range(0, len(rows), self.rows_per_batch)]
            skip, self.done_in_window = self.done_in_window, 0
            if skip:  # resumed inside this window: its planning skips were counted before the checkpoint
                self.pending.clear()
            for m, batch in enumerate(batches):
                if m < skip:
                    continue
                items: list = []
                for r, row in enumerate(batch):
                    for p in row:
                        p.row = r
                        items.append(p)
                state = {"sampler": window_state, "done_in_window": m + 1}
                counted, self.pending = dict(self.pending), Counter()
                yield items + [_Marker(self.rows_per_batch, state, counted, layouts[m] if layouts else None)]

    def load_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.done_in_window = int(state["done_in_window"])


class _Dataset(ImageLoadingDataset):
    def __getitem__(self, item):
        return item if isinstance(item, _Marker) else super().__getitem__(item)


def _collate(items: list, kind: str, ctx_args: dict):
    marker: _Marker = items[-1]
    rows: list[list[LoadedSample]] = [[] for _ in range(marker.num_rows)]
    skips: list[tuple[str, str]] = []  # (reason, message) of samples whose images failed in this worker
    loaded = 0
    for it in items[:-1]:
        if isinstance(it, Failed):
            skips.append((it.error.reason, str(it.error)))
            continue
        if kind != "preference":  # preference rows come from the pairs' layout below
            rows[it.planned.row].append(it)
        loaded += 1
    a = ctx_args
    if kind == "sft":
        batch = collate_sft(rows, a["seq_length"], a["pad_id"], a["tokens_per_tile"], a["image_token_id"], a["tile_size"])
    elif kind == "preference":  # 2 rows per pair slot, unpacked (chosen, rejected) or packed by marker.layout
        pairs = [None if isinstance(it, Failed) else it for it in items[:-1]]
        batch = collate_preference(pairs, a["seq_length"], a["pad_id"], a["tokens_per_tile"], a["image_token_id"],
                                   a["tile_size"], layout=marker.layout, num_rows=2 * marker.num_rows)
    else:
        batch = collate_rl([r[0] for r in rows if r], a["pad_id"], a["tile_size"])
    batch["_state"] = marker.state
    batch["_skips"] = skips
    batch["_plan_skips"] = marker.plan_skips
    batch["_loaded"] = loaded
    return batch


class DataIterator:
    """Endless iterator of micro-batch dicts with state_dict()/load_state_dict() (call before iterating)."""

    def __init__(self, ctx: DataContext, plans: MicroBatchPlans, kind: str, num_workers: int, prefetch_factor: int):
        self.ctx, self.plans = ctx, plans
        self.skips = SkipCounter()  # samples skipped in the micro-batches returned so far, by reason
        self._epoch, self._loaded_in_epoch = None, 0  # to notice an epoch in which no sample could be loaded
        self._partial_epoch = False  # resumed inside an epoch: its first part was loaded before the checkpoint
        args = dict(seq_length=ctx.seq_length, pad_id=ctx.tokenizer.pad_id, tokens_per_tile=ctx.tokens_per_tile,
                    image_token_id=ctx.image_token_id, tile_size=ctx.spec.tile_size)
        factory = functools.partial(build_image_pipeline, ctx.image_pipeline, ctx.spec, ctx.dali_device)
        gpu_dali = ctx.image_pipeline == "dali" and ctx.dali_device != "cpu" and torch.cuda.is_available()
        self.loader = torch.utils.data.DataLoader(
            _Dataset(factory, ctx.on_error),
            batch_sampler=plans,
            collate_fn=functools.partial(_collate, kind=kind, ctx_args=args),
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None,
            # CUDA cannot be used in forked children: GPU DALI workers start fresh (each builds its pipeline)
            multiprocessing_context="spawn" if gpu_dali and num_workers else None,
            persistent_workers=False,
        )
        self._it = None
        self._state = {"sampler": plans.sampler.state_dict(), "done_in_window": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self._check_epoch(batch["_state"]["sampler"]["epoch"])
        self._state = batch.pop("_state")
        self.skips.merge(batch.pop("_plan_skips"))
        for reason, message in batch.pop("_skips"):
            self.skips.add(DataError(reason, message))
        self._loaded_in_epoch += batch.pop("_loaded")
        return batch

    def _check_epoch(self, epoch: int) -> None:
        """At the first micro-batch of a new epoch: DataError when the whole previous epoch of this rank's shard gave
        no usable sample (e.g. every image fails to decode with data.on_error=skip), which would only give
        empty steps."""
        if epoch != self._epoch:
            if self._epoch is not None and self._loaded_in_epoch == 0 and not self._partial_epoch:
                raise DataError("no_valid_samples", f"no sample of this rank's shard of {self.ctx.path} could be "
                                f"loaded in epoch {self._epoch} (skipped: {self.skips.summary()}); fix the data "
                                "(tools/inspect_data.py shows why)")
            self._partial_epoch = self._epoch is None and self._partial_epoch
            self._epoch, self._loaded_in_epoch = epoch, 0

    def state_dict(self) -> dict:
        """Position after the last micro-batch returned by next()."""
        return {"sampler": dict(self._state["sampler"]), "done_in_window": self._state["done_in_window"]}

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("load_state_dict must be called before the first next()")
        self.plans.load_state(state)
        self._partial_epoch = True
        self._state = {"sampler": dict(state["sampler"]), "done_in_window": int(state["done_in_window"])}


def build_train_iterator(cfg, dp_rank: int = 0, dp_size: int = 1, path: str | Path | None = None,
                         state: dict | None = None) -> DataIterator:
    """Micro-batches for data.format (sft: packed rows; preference: 2 x micro_batch_size rows holding
    micro_batch_size pairs unpacked, or as many pairs as fit when packed)."""
    d = cfg.data
    ctx = build_data_context(cfg, path)
    sampler = ShardedSampler(len(ctx.planner.source), dp_rank, dp_size, d.seed, d.shuffle)
    if d.format == "rl":
        raise ValueError("data.format=rl: use build_rl_prompt_iterator (prompts have no labels)")
    rows = cfg.train.micro_batch_size
    packing = d.packing and d.format == "sft"
    pair_packing = d.packing and d.format == "preference"
    window = d.pack_window if (packing or pair_packing) else -(-d.pack_window // rows) * rows  # unpacked: whole micro-batches
    plans = MicroBatchPlans(ctx, sampler, rows, packing, window, pair_packing=pair_packing)
    it = DataIterator(ctx, plans, d.format, d.num_workers, d.prefetch_factor)
    if state is not None:
        it.load_state_dict(state)
    return it


def build_rl_prompt_iterator(cfg, batch_size: int, dp_rank: int = 0, dp_size: int = 1, path: str | Path | None = None,
                             state: dict | None = None) -> DataIterator:
    """Batches of `batch_size` RL prompts (data.format must be rl): see batch.collate_rl for the keys."""
    d = cfg.data
    if d.format != "rl":
        raise ValueError(f"build_rl_prompt_iterator needs data.format=rl, got {d.format}")
    ctx = build_data_context(cfg, path)
    sampler = ShardedSampler(len(ctx.planner.source), dp_rank, dp_size, d.seed, d.shuffle)
    window = -(-d.pack_window // batch_size) * batch_size  # whole batches per window
    plans = MicroBatchPlans(ctx, sampler, batch_size, False, window)
    it = DataIterator(ctx, plans, "rl", d.num_workers, d.prefetch_factor)
    if state is not None:
        it.load_state_dict(state)
    return it
