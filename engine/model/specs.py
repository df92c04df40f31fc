"""The one place that chooses Transformer Engine or our local modules.

`transformer_impl: auto` takes Transformer Engine when it imports (GPU clusters), the local spec
otherwise (CPU, or clusters without TE). Both the LLM layer spec and the vision encoder's modules come
from the backend returned here, so the two always agree.

The local spec is megatron's, with two modules of ours: `SDPAttention` (engine/model/attention.py: torch
fused attention, packed sequences, no [s, s] scores, no apex) as core attention, and `LocalNorm`, torch's
RMSNorm/LayerNorm marked for sequence parallel.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the CUDA/torch at hand
        return False
    return True


def resolve_impl(transformer_impl: str) -> str:
    if transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but transformer_engine.pytorch does not import; "
            "install transformer-engine[pytorch] (GPU machines) or set model.transformer_impl=local"
        )
    return transformer_impl


class LocalNorm:
    """torch RMSNorm / LayerNorm (per config.normalization), as megatron's WrappedTorchNorm builds them, but usable
    with sequence parallel: the weights are marked `sequence_parallel`, so megatron's finalize_model_grads sums
    their gradients over the TP group (each TP rank then normalises only its s/tp tokens)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("LocalNorm (torch norms) has no zero-centred gamma, persistent or memory-efficient "
                             "variant; use the Transformer Engine spec for those")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"LocalNorm supports RMSNorm and LayerNorm, not {config.normalization}")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _local_provider():
    from megatron.core.models.backends import LocalSpecProvider

    from engine.model.attention import SDPAttention

    class EngineLocalSpecProvider(LocalSpecProvider):
        """megatron's local linears with our core attention and norms."""

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
            return LocalNorm

        def core_attention(self) -> type:
            return SDPAttention

    return EngineLocalSpecProvider()


def backend_for(transformer_impl: str):
    """megatron `BackendSpecProvider`: column/row-parallel linear, norms, core attention."""
    if resolve_impl(transformer_impl) == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return _local_provider()


def llm_layer_spec(transformer_impl: str, qk_layernorm: bool = False, layers_per_stage: int | None = None):
    """Qwen2 decoder spec (RMSNorm, SwiGLU, GQA, qkv bias come from TransformerConfig).

    TE: megatron's TE layer spec. Local: megatron's local layer spec with SDPAttention and LocalNorm; with
    `layers_per_stage` it is returned as block submodules so the final norm is a LocalNorm too (megatron's
    default final norm for a layer spec is WrappedTorchNorm, which refuses sequence parallel)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_impl(transformer_impl) == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from engine.model.attention import SDPAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalNorm
    attn = layer.self_attention.submodules
    attn.core_attention = SDPAttention
    if qk_layernorm:
        attn.q_layernorm = attn.k_layernorm = LocalNorm
    if layers_per_stage is None:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * layers_per_stage, layer_norm=LocalNorm)
