"""Core attention for megatron's local (no Transformer Engine) spec, on torch's fused attention kernels.

megatron's `DotProductAttention` materialises the [b * heads, s, s] scores and, for bf16 at s <= 4096,
picks apex's fused softmax; it refuses packed sequences. `SDPAttention` keeps its constructor (and so its
attributes, checkpoint keys and the isinstance checks elsewhere) and replaces the forward:

* plain rows [s, b, heads, d]: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels on GPU, the blockwise flash kernel on CPU): no [s, s] score tensor, no apex;
* packed rows (THD, megatron `PackedSeqParams` with cu_seqlens): every sample attends only to itself,
  causally. On CUDA with bf16/fp16 one call of torch's varlen flash attention
  (`torch.nn.attention.varlen.varlen_attn`) does the whole pack; elsewhere each sample is one SDPA call;
* an explicit boolean mask (True = masked, megatron's convention; the native rollout engine's padded
  prefill/decode) goes to SDPA as its keep-mask.
The vision encoder uses the same module with AttnMaskType.no_mask.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


@functools.lru_cache(maxsize=None)
def _varlen_attn():
    """torch's varlen flash attention and how this torch spells causal, or None (older torch).

    torch 2.9-2.10 take `is_causal=`, 2.11+ `window_size=(-1, 0)`; only some versions have `enable_gqa`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal_kw = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal_kw = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal_kw, "enable_gqa" in params


def varlen_available(q: torch.Tensor) -> bool:
    """Whether a packed call on `q` runs as one varlen flash-attention kernel (else one SDPA per sample)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


class SDPAttention(DotProductAttention):
    """Drop-in core attention (same constructor as megatron's DotProductAttention). Inputs:
    query [sq, b, np, d], key/value [sk, b, ng, d] (or [t, np, d] / [t, ng, d] with THD packed_seq_params);
    output [sq, b, np * d] (THD: [t, np * d])."""

    @property
    def scale(self) -> float:
        """The product of megatron's two factors: with apply_query_key_layer_scaling it divides softmax_scale by
        the layer number and multiplies it back inside its fused softmax."""
        return self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention has no attention_bias; use the Transformer Engine spec")
        if self.softmax_offset is not None:
            raise NotImplementedError(f"SDPAttention supports softmax_type=vanilla only (got {self.config.softmax_type})")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL
        dropout = self.attention_dropout.p if self.training else 0.0
        # GQA: [*, ng, d] -> [*, np, d], as DotProductAttention does (a 5x copy of k/v for Qwen2.5-32B's 40/8
        # heads: small next to q and the MLP activations)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:  # the dropout RNG stream megatron uses
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._packed(query, key, value, packed_seq_params, causal, groups, dropout)
            if groups > 1:
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
            keep = None
            if attention_mask is not None:  # True = masked, broadcastable to [b, 1, sq, sk]
                keep = ~attention_mask
                causal = False  # the mask says everything
            elif causal and q.shape[2] != k.shape[2]:
                raise ValueError(f"causal attention of {q.shape[2]} queries over {k.shape[2]} keys needs an explicit "
                                 "attention_mask (which keys each query sees)")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scale)  # [b, np, sq, d]
        out = out.permute(2, 0, 1, 3)  # [sq, b, np, d]
        return out.reshape(out.shape[0], out.shape[1], -1)  # [sq, b, np * d]

    def _packed(self, query, key, value, params, causal: bool, groups: int, dropout: float) -> torch.Tensor:
        """THD: query [t, np, d], key/value [t, ng, d]; samples are cu_seqlens_q[i]:cu_seqlens_q[i+1]."""
        cu_q, cu_k = params.cu_seqlens_q, params.cu_seqlens_kv
        if params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
            raise NotImplementedError("SDPAttention packs samples back to back (no cu_seqlens_*_padded)")
        if cu_q is None or cu_k is None or int(cu_q.numel()) < 2:
            raise ValueError("packed (thd) attention needs cu_seqlens_q/kv with at least one sample")
        if varlen_available(query) and dropout == 0.0:
            varlen_attn, causal_kw, gqa = _varlen_attn()
            kw = dict(causal_kw) if causal else {}
            if groups > 1 and gqa:
                kw["enable_gqa"] = True
            elif groups > 1:
                key = key.repeat_interleave(groups, dim=1)
                value = value.repeat_interleave(groups, dim=1)
            out = varlen_attn(query, key, value, cu_q, cu_k, params.max_seqlen_q, params.max_seqlen_kv,
                              scale=self.scale, **kw)  # [t, np, d]
            return out.reshape(out.shape[0], -1)
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()  # one host sync per layer; the loop needs them
        outs = []
        for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query[q0:q1], key[k0:k1], value[k0:k1]))  # [1, n, L, d]
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=self.scale)
            outs.append(o[0].transpose(0, 1))  # [L, np, d]
        out = torch.cat(outs, dim=0)  # [t, np, d]
        return out.reshape(out.shape[0], -1)  # [t, np * d]
