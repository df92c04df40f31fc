"""Our typed model config -> megatron `TransformerConfig`s (one for the LLM, one for the ViT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _common(model_cfg, parallel_cfg, recompute: bool = False) -> dict:
    dtype = torch_dtype(model_cfg.params_dtype)
    cuda = torch.cuda.is_available()
    kw = dict(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # p2p buffers; must be set explicitly on CPU
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # Fusions that need apex / TE / CUDA kernels: off on CPU, megatron's defaults on GPU.
        masked_softmax_fusion=cuda,
        bias_activation_fusion=False,  # needs bias on fc1 for GELU-less SwiGLU paths; kept off both ways
        bias_dropout_fusion=cuda,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Weights are created as full tensors on the CPU with the default generator and then split,
        # so a given seed gives the same model at every TP size.
        use_cpu_initialization=True,
        init_method_std=0.02,
        calculate_per_token_loss=True,
        variable_seq_lengths=False,
    )
    if recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return kw


def fp8_kwargs(train_cfg) -> dict:
    """TE FP8 settings for TransformerConfig (validated in TrainConfig: TE present, bf16 params)."""
    if train_cfg is None or train_cfg.fp8 is None:
        return {}
    return dict(fp8=train_cfg.fp8, fp8_recipe=train_cfg.fp8_recipe, fp8_margin=train_cfg.fp8_margin,
                fp8_amax_history_len=train_cfg.fp8_amax_history_len,
                fp8_amax_compute_algo=train_cfg.fp8_amax_compute_algo)


def llm_transformer_config(model_cfg, parallel_cfg, recompute: bool = False, train_cfg=None):
    from megatron.core.transformer import TransformerConfig

    llm = model_cfg.llm
    return TransformerConfig(
        **fp8_kwargs(train_cfg),
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=llm.qkv_bias,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], act = silu(gate) * up
        activation_func=F.silu,
        **_common(model_cfg, parallel_cfg, recompute),
    )


def vision_transformer_config(model_cfg, parallel_cfg):
    """ViT blocks: bias everywhere, GELU MLP, no masks; PP never splits the encoder."""
    from megatron.core.transformer import TransformerConfig

    v = model_cfg.vision
    kw = _common(model_cfg, parallel_cfg)
    kw["pipeline_model_parallel_size"] = 1
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.built_heads,  # padded heads included; they stay exactly zero
        kv_channels=v.head_dim,
        normalization="RMSNorm" if v.norm_type == "rms_norm" else "LayerNorm",
        layernorm_epsilon=v.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=v.qkv_bias,
        gated_linear_unit=False,
        activation_func=F.gelu,
        **kw,
    )
