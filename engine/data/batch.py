"""Collate: loaded samples -> the micro-batch dict the model consumes.

SFT (packed or not), one dict per micro-batch, B rows of S = train.seq_length:
    tokens        int64   [B, S]  input ids, padded with the pad id
    labels        int64   [B, S]  labels[:, i] = tokens[:, i+1] of the same sample (pad id at a sample's
                                  last position and in padding; masked there)
    loss_mask     float32 [B, S]  1.0 where labels[:, i] is an assistant token to learn
    position_ids  int64   [B, S]  0, 1, ... restarting for every packed sample (0 in padding)
    segment_ids   int64   [B, S]  packed samples of a row numbered 1..k, padding 0 (attend only within
                                  equal ids, causally)
    pixel_values  float32 [N, 3, T, T]  every tile of every image, in order of appearance (row-major over
                                  batch then sequence); [0, 3, T, T] without images
    tiles_per_row int64   [B]
    sample_ids    list[list[str]] ids of the samples in each row
Number of image tokens in row b == tiles_per_row[b] * tokens_per_tile (checked here).

Preference: the chosen and rejected sequences of each pair are segments of the rows (unpacked: chosen of pair i
    in row 2i, rejected in row 2i+1; packed: several sequences per row, both of a pair in the same micro-batch),
    plus sequence_index [B, S], pair_index [2P] and scores [2P]: see `collate_preference`.
RL prompts: see `collate_rl`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.data.dataset import LoadedSample


def _check_image_tokens(tokens: np.ndarray, tiles: int, tokens_per_tile: int, image_token_id: int, ids) -> None:
    n = int((tokens == image_token_id).sum())
    if n != tiles * tokens_per_tile:
        raise AssertionError(
            f"row with samples {ids}: {n} image tokens but {tiles} tiles x {tokens_per_tile} = {tiles * tokens_per_tile}; "
            "tokenizer image token id and model.image_token_id / tokens_per_tile disagree"
        )


def collate_rows(rows: list[list[tuple[np.ndarray, np.ndarray, str]]], pixels: list[list[torch.Tensor]],
                 seq_length: int, pad_id: int, tokens_per_tile: int, image_token_id: int, tile_size: int) -> dict:
    """rows[b] = [(tokens int64 [L], learn bool [L], sample_id), ...] packed in that order; pixels[b] = the
    rows' per-sample tile tensors in the same order."""
    B, S = len(rows), seq_length
    tokens = np.full((B, S), pad_id, dtype=np.int64)
    labels = np.full((B, S), pad_id, dtype=np.int64)
    loss_mask = np.zeros((B, S), dtype=np.float32)
    position_ids = np.zeros((B, S), dtype=np.int64)
    segment_ids = np.zeros((B, S), dtype=np.int64)
    tiles_per_row = np.zeros(B, dtype=np.int64)
    sample_ids: list[list[str]] = []
    for b, row in enumerate(rows):
        pos = 0
        for k, (tok, learn, _) in enumerate(row):
            n = len(tok)
            if pos + n > S:
                raise ValueError(f"row {b} ({[r[2] for r in row]}) holds {pos + n} tokens > seq_length={S}")
            tokens[b, pos : pos + n] = tok
            labels[b, pos : pos + n - 1] = tok[1:]
            loss_mask[b, pos : pos + n - 1] = learn[1:]  # the label of position i is token i+1
            position_ids[b, pos : pos + n] = np.arange(n)
            segment_ids[b, pos : pos + n] = k + 1
            pos += n
        tiles_per_row[b] = sum(int(p.shape[0]) for p in pixels[b])
        sample_ids.append([r[2] for r in row])
        _check_image_tokens(tokens[b, :pos], int(tiles_per_row[b]), tokens_per_tile, image_token_id, sample_ids[-1])
    flat = [p for row_pixels in pixels for p in row_pixels if p.shape[0]]
    pixel_values = torch.cat(flat, dim=0) if flat else torch.zeros(0, 3, tile_size, tile_size)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "pixel_values": pixel_values.float(),
        "tiles_per_row": torch.from_numpy(tiles_per_row),
        "sample_ids": sample_ids,
    }


def collate_sft(rows: list[list[LoadedSample]], seq_length: int, pad_id: int, tokens_per_tile: int,
                image_token_id: int, tile_size: int) -> dict:
    return collate_rows(
        [[(s.planned.tokens, s.planned.learn, s.planned.id) for s in row] for row in rows],
        [[s.pixel_values for s in row] for row in rows],
        seq_length, pad_id, tokens_per_tile, image_token_id, tile_size,
    )


# A preference micro-batch layout: rows[b] = [(pair k of the micro-batch, 0 = chosen / 1 = rejected), ...] in order.
PairLayout = list[list[tuple[int, int]]]


def unpacked_pair_layout(num_pairs: int, num_rows: int) -> PairLayout:
    """One sequence per row: chosen of pair i in row 2i, rejected in row 2i+1 (then empty rows up to num_rows)."""
    rows = [[(i, which)] for i in range(num_pairs) for which in (0, 1)]
    return rows + [[] for _ in range(num_rows - len(rows))]


def pack_preference_pairs(pair_lengths: list[tuple[int, int]], rows_per_batch: int, seq_length: int
                          ) -> tuple[list[list[int]], list[PairLayout]]:
    """Pack preference pairs into micro-batches of `rows_per_batch` rows of `seq_length` tokens, both sequences of
    a pair in the same micro-batch (MPO compares them), any row.

    Two-level first fit decreasing: pairs longest (chosen + rejected) first; each goes to the first micro-batch
    whose rows take both of its sequences (longer sequence first, each into the first row with room), else to a
    new one. A pair whose sequences each fit a row always fits an empty micro-batch of >= 2 rows.
    Returns (pairs of each micro-batch as indices into pair_lengths, each micro-batch's PairLayout with k = the
    pair's position in that micro-batch's list)."""
    if rows_per_batch < 2:
        raise ValueError("packed preference micro-batches need >= 2 rows (a pair may need one row per sequence)")
    order = sorted(range(len(pair_lengths)), key=lambda i: -(pair_lengths[i][0] + pair_lengths[i][1]))
    batches: list[tuple[list[int], list[int], PairLayout]] = []  # (free tokens per row, pairs, layout)

    def place(free: list[int], seqs) -> list[tuple[int, int]] | None:
        """(row, which) of each sequence by first fit, committed to `free` only if both fit."""
        trial, spots = list(free), []
        for length, which in seqs:
            row = next((b for b, f in enumerate(trial) if f >= length), None)
            if row is None:
                return None
            trial[row] -= length
            spots.append((row, which))
        free[:] = trial
        return spots

    for i in order:
        c, r = pair_lengths[i]
        if max(c, r) > seq_length:
            raise ValueError(f"preference pair {i}: {c} + {r} tokens, a sequence longer than seq_length={seq_length}")
        seqs = sorted(((c, 0), (r, 1)), reverse=True)
        for free, pairs, layout in batches:
            spots = place(free, seqs)
            if spots is not None:
                break
        else:  # no open micro-batch takes it: open one (two empty rows always do)
            free, pairs, layout = [seq_length] * rows_per_batch, [], [[] for _ in range(rows_per_batch)]
            batches.append((free, pairs, layout))
            spots = place(free, seqs)
        for row, which in sorted(spots, key=lambda t: t[1]):  # chosen before rejected within a row
            layout[row].append((len(pairs), which))
        pairs.append(i)
    return [p for _, p, _ in batches], [lay for _, _, lay in batches]


def collate_preference(pairs: list[LoadedSample | None], seq_length: int, pad_id: int, tokens_per_tile: int,
                       image_token_id: int, tile_size: int, layout: PairLayout | None = None,
                       num_rows: int | None = None) -> dict:
    """Preference micro-batch: the sequences of `pairs` laid out by `layout` (default: unpacked, one per row) as
    segments of `num_rows` rows. Pairs that are None (failed to load) are left out with both their sequences;
    the remaining pairs are renumbered in order. Adds to the collate_rows keys:
        sequence_index int64 [B, S]  j = 2 * pair + (0 chosen | 1 rejected) of the sequence at each token, -1 in padding
        pair_index     int64 [2P]    pair of sequence j (= j // 2)
        scores         float32 [2P]  the file's chosen / rejected scores (NaN when it has none)
    Each sequence owns its tiles (a pair's images appear once per sequence)."""
    if layout is None:
        layout = unpacked_pair_layout(len(pairs), num_rows or 2 * len(pairs))
    num_rows = num_rows or len(layout)
    if len(layout) > num_rows:
        raise ValueError(f"preference layout has {len(layout)} rows, the micro-batch {num_rows}")
    kept = [k for k, s in enumerate(pairs) if s is not None]
    renumber = {k: n for n, k in enumerate(kept)}
    rows, pixels, seq_of_segment = [], [], []
    for row in list(layout) + [[] for _ in range(num_rows - len(layout))]:
        row = [(k, which) for k, which in row if k in renumber]
        enc = [(pairs[k].planned, which) for k, which in row]
        rows.append([(p.tokens, p.learn, p.id) if which == 0 else (p.rejected.tokens, p.rejected.learn, p.id)
                     for p, which in enc])
        pixels.append([pairs[k].pixel_values for k, _ in row])
        seq_of_segment.append([-1] + [2 * renumber[k] + which for k, which in row])  # segment id -> sequence j
    batch = collate_rows(rows, pixels, seq_length, pad_id, tokens_per_tile, image_token_id, tile_size)
    width = max(len(t) for t in seq_of_segment)
    lut = torch.tensor([t + [-1] * (width - len(t)) for t in seq_of_segment], dtype=torch.int64)  # (B, k+1)
    batch["sequence_index"] = torch.gather(lut, 1, batch["segment_ids"])  # (B, S)
    batch["pair_index"] = torch.arange(2 * len(kept), dtype=torch.int64) // 2
    scores = [v for k in kept for v in pairs[k].planned.scores]
    batch["scores"] = torch.tensor([math.nan if v is None else v for v in scores], dtype=torch.float32)
    return batch


def collate_rl(prompts: list[LoadedSample], pad_id: int, tile_size: int) -> dict:
    """RL prompts (no labels): the generation prompt of each sample, right-padded.
        tokens         int64 [B, Lmax]   prompt ids, padded with the pad id
        prompt_lengths int64 [B]
        prompt_ids     list[list[int]]   unpadded (what a rollout engine takes)
        pixel_values   float32 [N, 3, T, T], tiles_per_row int64 [B], sample_ids list[list[str]]
        image_paths    list[list[str]]   the files (rollout engines that want PIL images reopen them)
        answers        list[str] gold answers; answer_types list[str] ("free-form" | "multiple-choice")"""
    B = len(prompts)
    lmax = max((len(s.planned) for s in prompts), default=0)
    tokens = np.full((B, lmax), pad_id, dtype=np.int64)
    for b, s in enumerate(prompts):
        tokens[b, : len(s.planned)] = s.planned.tokens
    flat = [s.pixel_values for s in prompts if s.pixel_values.shape[0]]
    return {
        "tokens": torch.from_numpy(tokens),
        "prompt_lengths": torch.tensor([len(s.planned) for s in prompts], dtype=torch.int64),
        "prompt_ids": [s.planned.tokens.tolist() for s in prompts],
        "pixel_values": torch.cat(flat) if flat else torch.zeros(0, 3, tile_size, tile_size),
        "tiles_per_row": torch.tensor([s.pixel_values.shape[0] for s in prompts], dtype=torch.int64),
        "sample_ids": [[s.planned.id] for s in prompts],
        "image_paths": [[str(p) for p in s.planned.images] for s in prompts],
        "answers": [s.planned.answer for s in prompts],
        "answer_types": [s.planned.answer_type for s in prompts],
    }


def select_rl_rows(batches: list[dict], picks: list[tuple[int, int]], pad_id: int) -> dict:
    """A collate_rl batch of the rows `picks` = [(batch index, row index)] of `batches` (collate_rl batches),
    in that order: tiles follow their rows, prompts are re-padded with `pad_id`."""
    tile_size = batches[0]["pixel_values"].shape[-1] if batches else 0
    rows = []
    for bi, ri in picks:
        b = batches[bi]
        start = int(b["tiles_per_row"][:ri].sum())
        n_tiles = int(b["tiles_per_row"][ri])
        rows.append((b, ri, b["pixel_values"][start: start + n_tiles]))
    lmax = max((len(b["prompt_ids"][ri]) for b, ri, _ in rows), default=0)
    tokens = torch.full((len(rows), lmax), pad_id, dtype=torch.int64)
    for k, (b, ri, _) in enumerate(rows):
        tokens[k, : len(b["prompt_ids"][ri])] = torch.tensor(b["prompt_ids"][ri], dtype=torch.int64)
    tiles = [t for _, _, t in rows if t.shape[0]]
    return {
        "tokens": tokens,
        "prompt_lengths": torch.tensor([len(b["prompt_ids"][ri]) for b, ri, _ in rows], dtype=torch.int64),
        "prompt_ids": [list(b["prompt_ids"][ri]) for b, ri, _ in rows],
        "pixel_values": torch.cat(tiles) if tiles else torch.zeros(0, 3, tile_size, tile_size),
        "tiles_per_row": torch.tensor([t.shape[0] for _, _, t in rows], dtype=torch.int64),
        **{key: [b[key][ri] for b, ri, _ in rows] for key in ("sample_ids", "image_paths", "answers", "answer_types")},
    }


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For megatron PackedSeqParams (THD): boundaries of every segment over the flattened [B*S] batch,
    each row's padding tail counted as one more segment. Returns (cu_seqlens int32 [n+1], max_seqlen)."""
    B, S = segment_ids.shape
    flat = segment_ids.reshape(-1)  # [B*S]
    row_start = torch.zeros_like(flat, dtype=torch.bool)
    row_start[::S] = True
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(change | row_start).squeeze(1)
    cu = torch.cat([starts, torch.tensor([B * S], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
