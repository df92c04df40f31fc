"""Our typed model config -> megatron `TransformerConfig`s (one for the LLM, one for the ViT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _common(model_cfg, parallel_cfg, perf=None) -> dict:
    """Settings shared by the LLM and the ViT. `perf`: engine.config.performance.ResolvedPerformance (None: the
    CPU defaults, e.g. for checkpoint conversion)."""
    dtype = torch_dtype(model_cfg.params_dtype)
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
        # The local spec's attention is engine.model.attention.SDPAttention (no apex softmax) and TE brings its
        # own kernels, so megatron's masked-softmax fusion is never on the path.
        masked_softmax_fusion=False,
        bias_activation_fusion=bool(perf and perf.bias_activation_fusion),
        bias_dropout_fusion=torch.cuda.is_available(),  # a jit-scripted add, no extension needed
        apply_rope_fusion=bool(perf and perf.rope_fusion),
        persist_layer_norm=False,
        gradient_accumulation_fusion=bool(perf and perf.gradient_accumulation_fusion),
        # CPU initialisation: weights are created as full tensors with the default generator and then split, so
        # a given seed gives the same model at every TP size. GPU initialisation builds each rank's shard on
        # its GPU (megatron's per-rank init; no full 38B tensors in host memory).
        use_cpu_initialization=perf.cpu_initialization if perf is not None else True,
        init_method_std=0.02,
        calculate_per_token_loss=True,
        variable_seq_lengths=False,
        # gloo's batched p2p (batch_isend_irecv) pairs the interleaved schedule's concurrent same-shaped sends
        # wrongly (seen at PP=2 x 2 virtual stages: every micro-batch after the first group got another's
        # activations); individual isend/irecv are exact. NCCL keeps megatron's default.
        batch_p2p_comm=torch.cuda.is_available(),
    )
    return kw


def _recompute_kwargs(perf) -> dict:
    if perf is None or perf.recompute_granularity is None:
        return {}
    if perf.recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity="selective", recompute_modules=list(perf.recompute_modules))


def fp8_kwargs(train_cfg) -> dict:
    """TE FP8 settings for TransformerConfig (validated in TrainConfig: TE present, bf16 params)."""
    if train_cfg is None or train_cfg.fp8 is None:
        return {}
    return dict(fp8=train_cfg.fp8, fp8_recipe=train_cfg.fp8_recipe, fp8_margin=train_cfg.fp8_margin,
                fp8_amax_history_len=train_cfg.fp8_amax_history_len,
                fp8_amax_compute_algo=train_cfg.fp8_amax_compute_algo)


def llm_transformer_config(model_cfg, parallel_cfg, perf=None, train_cfg=None):
    """`perf`: engine.config.performance.ResolvedPerformance for this machine (None: CPU defaults, no recompute)."""
    from megatron.core.transformer import TransformerConfig

    llm = model_cfg.llm
    vpp = getattr(parallel_cfg, "virtual_pipeline_model_parallel_size", 1)
    return TransformerConfig(
        **fp8_kwargs(train_cfg),
        **_recompute_kwargs(perf),
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
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        **_common(model_cfg, parallel_cfg, perf),
    )


def vision_transformer_config(model_cfg, parallel_cfg, perf=None):
    """ViT blocks: bias everywhere, GELU MLP, no masks. PP never splits the encoder and it runs without sequence
    parallel (its tiles are not sequence-sharded; its output is merged into the LLM's sequence before the
    LLM scatters it). The ViT recomputes whole blocks itself (performance.recompute_vision), not through megatron."""
    from megatron.core.transformer import TransformerConfig

    v = model_cfg.vision
    kw = _common(model_cfg, parallel_cfg, perf)
    kw["pipeline_model_parallel_size"] = 1
    kw["sequence_parallel"] = False
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
