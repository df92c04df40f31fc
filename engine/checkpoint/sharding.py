"""Sharded state dict (megatron dist checkpointing) for modules megatron's default gets wrong.

megatron's default treats every tensor of a plain `nn.Module` / `nn.ModuleList` as replicated across
TP, which is wrong for the ViT's and connector's Column/RowParallelLinears inside a ModuleList and for
`FullWidthRMSNorm.weight` (TP-split along dim 0). Here the split comes from the parameters' own
megatron attributes (`tensor_model_parallel`, `partition_dim`), the same rule `engine.parallel.full_state`
uses, so a checkpoint holds the full (TP=1) tensors whatever TP wrote it.
"""

from __future__ import annotations

from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint


def _tp_group(module):
    for m in module.modules():
        group = getattr(m, "tp_group", None)
        if group is not None:
            return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_sharded_state_dict(module, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group, dp_cp_group = _tp_group(module), metadata["dp_cp_group"]
    out, rest = {}, {}
    for name, t in module.state_dict(prefix="", keep_vars=True).items():
        if getattr(t, "tensor_model_parallel", False):
            out[prefix + name] = make_tp_sharded_tensor_for_checkpoint(
                t, prefix + name, tp_axis=t.partition_dim, prepend_offsets=sharded_offsets,
                tp_group=tp_group, dp_cp_group=dp_cp_group,
            )
        else:
            rest[name] = t
    out.update(make_sharded_tensors_for_checkpoint(
        rest, prefix, {}, sharded_offsets=sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp_group
    ))
    return out
