"""GRPO training rows: rollouts (prompt + response) packed to `train.seq_length` with the native
first-fit-decreasing packer, in the SFT batch contract (engine/data/batch.py: segment_ids 1..k per row and 0
in padding, position_ids restarting at 0 per sample, tiles in order of appearance, tiles_per_row), plus the
per-token GRPO fields, aligned with `labels` (position i holds the value for the token labels[:, i]):

    advantages        float32 [B, S]  the sample's advantage on its response positions, 0 elsewhere
    rollout_logprobs  float32 [B, S]  the engine's log-prob of each sampled response token (0 at forced ones)
    sample_mask       float32 [B, S]  1 on every response position (learned or not): which samples exist,
                                      for the seq-mean modes' TRL convention (algorithm.grpo.seq_mean_counts_empty)
    loss_mask         float32 [B, S]  1 on the response tokens that enter the loss (sampled, not overlong-masked)
later joined by old_logprobs / entropy / ref_logprobs from the trainer's own forward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from engine.data.batch import collate_rows
from engine.data.packing import pack_rows

GRPO_FIELDS = ("advantages", "rollout_logprobs", "sample_mask")


def check_fits(rows, seq_length: int) -> None:
    for r in rows:
        n = len(r.prompt_ids) + len(r.response_ids)
        if n > seq_length:
            raise ValueError(
                f"GRPO sample {r.sample_id}: prompt ({len(r.prompt_ids)} tokens) + response ({len(r.response_ids)}) = "
                f"{n} tokens > train.seq_length={seq_length}; raise train.seq_length to the longest prompt + "
                "algorithm.grpo.max_response_length")


def pack_rollouts(rows, advantages: torch.Tensor, seq_length: int, micro_batch_size: int, pad_id: int,
                  tokens_per_tile: int, image_token_id: int, tile_size: int, pack: bool = True) -> list[dict]:
    """Rollouts -> micro-batches of `micro_batch_size` rows of `seq_length` tokens (the last one topped up with
    empty rows). pack=False puts one sample per row (the unpacked reference the packed batches are tested against)."""
    if not rows:
        return []
    check_fits(rows, seq_length)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rows]
    layout = pack_rows(lengths, seq_length) if pack else [[i] for i in range(len(rows))]
    seqs, per_token = [], []
    for i, r in enumerate(rows):
        p, n = len(r.prompt_ids), lengths[i]
        tokens = np.asarray(r.prompt_ids + r.response_ids, dtype=np.int64)
        learn = np.zeros(n, dtype=bool)
        learn[p:] = r.learned()
        seqs.append((tokens, learn, r.sample_id))
        # per-token values at label positions: position k of the sample predicts token k + 1
        values = np.zeros((len(GRPO_FIELDS), n), dtype=np.float32)
        values[0, p - 1: n - 1] = float(advantages[i])
        values[1, p - 1: n - 1] = r.rollout_logprobs
        values[2, p - 1: n - 1] = 1.0
        per_token.append(values)
    micro = []
    for start in range(0, len(layout), micro_batch_size):
        # the last micro-batch is topped up with empty rows (all padding, segment id 0): every micro-batch of a
        # step has the same [micro_batch_size, seq_length] shape, as megatron's schedule needs
        chunk = layout[start: start + micro_batch_size]
        chunk = chunk + [[] for _ in range(micro_batch_size - len(chunk))]
        batch = collate_rows([[seqs[i] for i in row] for row in chunk], [[rows[i].tiles for i in row] for row in chunk],
                             seq_length, pad_id, tokens_per_tile, image_token_id, tile_size)
        extra = np.zeros((len(GRPO_FIELDS), len(chunk), seq_length), dtype=np.float32)  # (fields, B, S)
        for b, row in enumerate(chunk):
            pos = 0
            for i in row:
                extra[:, b, pos: pos + lengths[i]] = per_token[i]
                pos += lengths[i]
        for k, name in enumerate(GRPO_FIELDS):
            batch[name] = torch.from_numpy(extra[k])
        micro.append(batch)
    return micro


def split_for_steps(rows, advantages: torch.Tensor, steps: int) -> list[tuple[list, torch.Tensor]]:
    """This rank's rows in `steps` contiguous, near-equal parts: one per optimizer step (mini-batch)."""
    parts = np.array_split(np.arange(len(rows)), steps)
    return [([rows[i] for i in idx.tolist()], advantages[torch.from_numpy(idx)]) for idx in parts]


def without_loss(batch: dict) -> dict:
    """A copy of a micro-batch that contributes no loss, no count and no gradient (DP padding)."""
    pad = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    for key in ("loss_mask", "sample_mask", "advantages"):
        pad[key] = torch.zeros_like(pad[key])
    return pad


def even_over_ranks(steps: list[list[dict]], dp_group) -> list[list[dict]]:
    """Every DP rank runs the same number of micro-batches in each optimizer step (one schedule, one gradient
    reduction): shorter steps get loss-free copies of one of this rank's micro-batches. Collective over DP."""
    counts = [len(s) for s in steps]
    everyone: list[list[int]] = [None] * dist.get_world_size(dp_group)  # type: ignore[list-item]
    dist.all_gather_object(everyone, counts, group=dp_group)
    target = [max(c[k] for c in everyone) for k in range(len(steps))]
    if sum(target) == 0:
        raise RuntimeError("no training rows on any rank this episode (empty rollouts); check the prompts")
    template = next((mb for s in steps for mb in s), None)
    if template is None:
        raise RuntimeError("this rank has no rollouts this episode while others do")
    return [s + [without_loss(template) for _ in range(t - len(s))] for s, t in zip(steps, target)]


def row_fill(micro: list[dict]) -> float:
    """Share of the rows' token slots that hold sample tokens (segment id > 0): packing efficiency."""
    filled = sum(int((mb["segment_ids"] > 0).sum()) for mb in micro)
    slots = sum(mb["segment_ids"].numel() for mb in micro)
    return filled / max(slots, 1)
