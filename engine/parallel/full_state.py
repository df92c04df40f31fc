"""Full (unsharded) tensors <-> this rank's TP/PP shards, for the VLM's parameters and gradients.

The "full" form is what a TP=1, PP=1 model holds, with two normalisations so it is the same at every
layout: LLM layers carry their global index, and the vocab padding rows are dropped. Sharding rules
come from megatron's own parameter attributes (`tensor_model_parallel`, `partition_dim`) plus one
layout rule megatron applies to SwiGLU: each TP rank's `linear_fc1` shard is [gate_r; up_r], so the full
tensor [gate; up] is split per half.

Used by the TP/PP equivalence tests and by checkpoint conversion (HF -> full -> shards).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

VOCAB_PARAMS = ("llm.embedding.word_embeddings.weight", "llm.output_layer.weight")
_LAYER_RE = re.compile(r"^llm\.decoder\.layers\.(\d+)\.")


def is_gated_fc1(name: str, model) -> bool:
    return name.startswith("llm.") and name.endswith("mlp.linear_fc1.weight") and model.llm.config.gated_linear_unit


def global_param_name(name: str, model) -> str:
    m = _LAYER_RE.match(name)
    if not m:
        return name
    layer = model.llm.decoder.layers[int(m.group(1))]
    return f"llm.decoder.layers.{layer.layer_number - 1}." + name[m.end():]


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _split(full: torch.Tensor, dim: int, rank: int, size: int, gated: bool) -> torch.Tensor:
    if gated:  # full = [gate; up]; rank r holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def gather_tp_shards(local: torch.Tensor, dim: int, group, size: int, gated: bool) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if gated:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _named_tensors(model, grads: bool):
    for name, p in model.named_parameters():
        t = getattr(p, "main_grad", None) if grads else p.data
        if grads and (t is None or not p.requires_grad):
            t = p.grad
        if t is None:
            continue
        yield name, p, t


def full_state(model, tp_group, vocab_size: int, grads: bool = False) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters (or gradients) as full tensors, keyed by global name.

    Collective over the TP group: every TP rank must call it.
    """
    rank, size = _tp(tp_group)
    out = {}
    for name, p, t in _named_tensors(model, grads):
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            t = gather_tp_shards(t, p.partition_dim, tp_group, size, is_gated_fc1(name, model))
        if name in VOCAB_PARAMS:
            t = t[:vocab_size]
        out[global_param_name(name, model)] = t.detach().clone()
    return out


def load_full_state(model, full: dict[str, torch.Tensor], tp_group, strict: bool = True) -> list[str]:
    """Copy full tensors into this rank's shards. Returns the full names that were used.

    A tied output layer on the last stage (no own tensor in `full`) takes the embedding.
    """
    rank, size = _tp(tp_group)
    used = []
    for name, p in model.named_parameters():
        key = global_param_name(name, model)
        if key not in full and key == "llm.output_layer.weight" and model.share_embeddings_and_output_weights:
            key = "llm.embedding.word_embeddings.weight"
        if key not in full:
            if strict:
                raise KeyError(f"full state has no tensor for parameter '{key}' (local name '{name}')")
            continue
        t = full[key]
        if name in VOCAB_PARAMS:  # pad the vocab rows back: (V, h) -> (V_padded, h)
            padded_rows = p.shape[0] * (size if getattr(p, "tensor_model_parallel", False) else 1)
            if t.shape[0] > padded_rows:
                raise ValueError(f"'{key}' has {t.shape[0]} rows but the model's padded vocab is {padded_rows}")
            t = torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])], dim=0)
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            t = _split(t, p.partition_dim, rank, size, is_gated_fc1(name, model))
        if t.shape != p.shape:
            raise ValueError(f"'{key}': full tensor gives shard {tuple(t.shape)}, parameter is {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
        used.append(key)
    return used
