"""Samples from JSONL to token ids (planning, main process) and to pixels (loading, any worker).

`plan(i)` parses and validates line i, reads the image headers, picks each image's tile grid, applies
the chat template and checks the length: everything the packer needs, without decoding pixels.
`load(planned)` decodes and tiles the images with the configured pipeline and checks the tile counts
match the plan. Both raise DataError (file:line, reason); the on_error policy is applied by callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.errors import DataError
from engine.data.formats import Sample, SampleSource
from engine.data.images import ImagePipeline, TileSpec, probe
from engine.data.template import ChatTemplate, Encoded, fit_length


@dataclass
class PlannedSample:
    id: str
    where: str
    fmt: str
    tokens: np.ndarray  # int64 [L]: sft conversation / preference chosen / rl prompt
    learn: np.ndarray  # bool [L]
    images: list[Path]
    tiles: list[int]  # per image, thumbnail included
    truncated: bool = False
    rejected: Encoded | None = None  # preference only
    answer: str = ""  # rl only
    answer_type: str = ""
    scores: tuple[float | None, float | None] = (None, None)
    row: int = 0  # which row of its micro-batch (set by the planner)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def image_tokens(self) -> int:
        return int(sum(self.tiles))


@dataclass
class LoadedSample:
    planned: PlannedSample
    pixel_values: torch.Tensor  # [sum(tiles), 3, T, T] float32


@dataclass
class Failed:
    """A sample that failed while loading (in a worker); carried to the main process to be counted."""

    planned: PlannedSample
    error: DataError


class Planner:
    def __init__(self, source: SampleSource, template: ChatTemplate, spec: TileSpec, seq_length: int,
                 image_token_id: int, truncate: bool = False):
        self.source = source
        self.template = template
        self.spec = spec
        self.seq_length = seq_length
        self.image_token_id = image_token_id
        self.truncate = truncate

    def _tiles(self, sample: Sample) -> list[int]:
        tiles = []
        for path in sample.images:
            try:
                tiles.append(probe(path, self.spec.max_pixels).num_tiles(self.spec))
            except DataError as e:
                raise DataError(e.reason, f"sample {sample.id}: {e}", sample.where) from None
        return tiles

    def plan(self, i: int) -> PlannedSample:
        sample = self.source[i]
        tiles = self._tiles(sample)
        fmt = self.source.fmt
        if fmt == "sft":
            enc = fit_length(self.template.conversation(sample, tiles), self.seq_length, self.truncate, sample,
                             self.image_token_id)
            return PlannedSample(sample.id, sample.where, fmt, enc.tokens, enc.learn, sample.images, tiles, enc.truncated)
        prompt = self.template.generation_prompt(sample, tiles)
        if fmt == "rl":
            enc = fit_length(prompt, self.seq_length, False, sample, self.image_token_id)
            return PlannedSample(sample.id, sample.where, fmt, enc.tokens, enc.learn, sample.images, tiles,
                                 answer=sample.answer, answer_type=sample.answer_type)
        # preference: truncation would make chosen and rejected incomparable, so too long is an error
        chosen = fit_length(self.template.with_response(prompt, sample.chosen, sample), self.seq_length, False, sample,
                            self.image_token_id)
        rejected = fit_length(self.template.with_response(prompt, sample.rejected, sample), self.seq_length, False,
                              sample, self.image_token_id)
        return PlannedSample(sample.id, sample.where, fmt, chosen.tokens, chosen.learn, sample.images, tiles,
                             rejected=rejected, scores=(sample.chosen_score, sample.rejected_score))


def load_images(planned: PlannedSample, pipeline: ImagePipeline) -> LoadedSample:
    """Decode + tile the sample's images; raises DataError naming the sample and the image."""
    t = pipeline.spec.tile_size
    if not planned.images:
        return LoadedSample(planned, torch.zeros(0, 3, t, t))
    results = pipeline.process(planned.images)
    tiles = []
    for path, res, want in zip(planned.images, results, planned.tiles):
        if isinstance(res, DataError):
            raise DataError(res.reason, f"sample {planned.id}: {res}", planned.where)
        if res.num_tiles != want:
            raise DataError("image_changed", f"sample {planned.id}: image {path} gave {res.num_tiles} tiles, "
                            f"planned {want} from its header; was the file replaced during the run?", planned.where)
        tiles.append(res.pixel_values)
    return LoadedSample(planned, torch.cat(tiles, dim=0))


class ImageLoadingDataset(torch.utils.data.Dataset):
    """DataLoader adapter: the "index" is a PlannedSample (sent by the planner); the item its pixels.
    The image pipeline is built lazily so each worker process builds its own (DALI pipelines don't fork)."""

    def __init__(self, pipeline_factory, on_error: str):
        self.pipeline_factory = pipeline_factory
        self.on_error = on_error
        self._pipeline = None

    def __getitem__(self, planned: PlannedSample) -> LoadedSample | Failed:
        if self._pipeline is None:
            self._pipeline = self.pipeline_factory()
        try:
            return load_images(planned, self._pipeline)
        except DataError as e:
            if self.on_error == "raise":
                raise
            return Failed(planned, e)

    def __len__(self) -> int:  # not used: the batch sampler drives the DataLoader
        raise TypeError("ImageLoadingDataset is indexed by PlannedSample, it has no length")
