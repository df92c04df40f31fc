"""Stream our megatron TP/PP shards as HF-named full tensors, one tensor group at a time, in buckets.

No rank ever holds the whole model: for each adapter group (a layer, or a part's embeddings/norms)
the TP shards are all-gathered into full tensors, renamed/split by the checkpoint adapter (`to_hf`),
and appended to a bucket; a bucket is handed out once it reaches `bucket_bytes`, then dropped.
With PP > 1 a group lives on one stage; that stage broadcasts it over the PP group so every rank's
rollout engine receives the whole model. Collective: every rank of the TP and PP groups iterates the
stream to the end, in the same order.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from engine.checkpoint.adapters import ADAPTERS, Group
from engine.parallel.full_state import VOCAB_PARAMS, gather_tp_shards, global_param_name, is_gated_fc1


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _local_by_full_name(model) -> dict[str, tuple[str, torch.nn.Parameter]]:
    return {global_param_name(name, model): (name, p) for name, p in model.named_parameters()}


def _gather_full(model, local: dict, names: list[str], tp_group, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our full (TP=1, unpadded) tensors for `names` from this rank's shards. Collective over TP."""
    size = _size(tp_group)
    out = {}
    for full_name in names:
        name, p = local[full_name]
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            t = gather_tp_shards(t, p.partition_dim, tp_group, size, is_gated_fc1(name, model))
        if name in VOCAB_PARAMS:
            t = t[:vocab_size]  # TP padding rows are not part of the HF model
        out[full_name] = t
    return out


def _groups_here(model, groups: list[Group]) -> list[bool]:
    local = _local_by_full_name(model)
    return [all(m.ours in local for m in g.maps) for g in groups]


def hf_weight_buckets(model, model_cfg, layout: str, tp_group, pp_group=None,
                      bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor), each about `bucket_bytes` (a group is never split)."""
    adapter = ADAPTERS[layout]
    parts = [p for p in adapter.parts if p == "llm" or not model_cfg.text_only]
    groups = [g for g in adapter.groups(model_cfg, parts=parts) if g.maps]
    local = _local_by_full_name(model)
    vocab = model_cfg.llm.vocab_size
    pp = _size(pp_group)
    owners = None
    if pp > 1:  # which PP stage holds each group: gathered once
        here = _groups_here(model, groups)
        everyone: list[list[bool]] = [None] * pp  # type: ignore[list-item]
        dist.all_gather_object(everyone, here, group=pp_group)
        owners = [next((s for s in range(pp) if everyone[s][i]), None) for i in range(len(groups))]
        missing = [g.name for g, o in zip(groups, owners) if o is None]
        if missing:
            raise RuntimeError(f"weight push: no pipeline stage holds the tensors of groups {missing[:5]}")
    bucket: list[tuple[str, torch.Tensor]] = []
    nbytes = 0
    for i, group in enumerate(groups):
        names = [m.ours for m in group.maps]
        if owners is None:
            hf = adapter.to_hf(_gather_full(model, local, names, tp_group, vocab), model_cfg, group)
        else:
            payload = [None]
            if dist.get_rank(pp_group) == owners[i]:
                payload = [adapter.to_hf(_gather_full(model, local, names, tp_group, vocab), model_cfg, group)]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(pp_group, owners[i]), group=pp_group)
            hf = payload[0]
        for name, t in hf.items():
            bucket.append((name, t))
            nbytes += t.numel() * t.element_size()
        if nbytes >= bucket_bytes:
            yield bucket
            bucket, nbytes = [], 0
    if bucket:
        yield bucket
