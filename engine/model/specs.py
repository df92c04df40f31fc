"""The one place that chooses Transformer Engine or megatron's local modules.

`transformer_impl: auto` takes Transformer Engine when it imports (GPU clusters), the local spec
otherwise (CPU, or clusters without TE). Both the LLM layer spec and the vision encoder's modules come
from the backend returned here, so the two always agree.
"""

from __future__ import annotations

import functools


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


def backend_for(transformer_impl: str):
    """megatron `BackendSpecProvider`: column/row-parallel linear, norms, core attention."""
    if resolve_impl(transformer_impl) == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def llm_layer_spec(transformer_impl: str, qk_layernorm: bool = False):
    """Qwen2 decoder layer spec (RMSNorm, SwiGLU, GQA, qkv bias come from TransformerConfig)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_impl(transformer_impl) == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
