"""Model sub-configs: vision encoder, connector (projector), LLM, and their composition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class VisionConfig:
    """InternViT-style encoder. Defaults: InternViT-300M-448px-V2.5 shapes."""

    image_size: int = field_(448, "tile side in pixels", bounds="[1, inf)")
    patch_size: int = field_(14, "conv patch size (kernel = stride)", bounds="[1, inf)")
    num_channels: int = field_(3, "input channels", bounds="[1, inf)")
    hidden_size: int = field_(1024, "embedding width", bounds="[1, inf)")
    ffn_hidden_size: int = field_(4096, "MLP inner width", bounds="[1, inf)")
    num_layers: int = field_(24, "transformer blocks", bounds="[1, inf)")
    num_attention_heads: int = field_(16, "attention heads of the checkpoint", bounds="[1, inf)")
    padded_num_heads: int = field_(
        0, "build this many heads, the extra ones all-zero, so TP divides them (InternViT-6B: 25 -> 32 for TP=8); 0 = none",
        bounds="[0, inf)")
    norm_type: Literal["layer_norm", "rms_norm"] = field_("layer_norm", "block norm (InternViT-6B: rms_norm)")
    norm_eps: float = field_(1e-6, "norm epsilon", bounds="(0, 1)")
    qk_norm: bool = field_(False, "RMSNorm over the full q and k width (InternViT-6B: true)")
    qkv_bias: bool = field_(True, "bias on q/k/v projections (InternViT-6B: false)")
    layer_scale_init: float = field_(0.1, "initial value of the ls1/ls2 (lambda) layer scales", bounds="(-inf, inf)")
    select_layer: int = field_(-1, "which block's output feeds the connector (-1 = last)", bounds="(-inf, inf)")
    freeze: bool = field_(False, "keep the encoder's weights fixed")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def built_heads(self) -> int:
        return self.padded_num_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, root) -> None:
        tp = root.parallel.tensor_model_parallel_size
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.vision.hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.padded_num_heads and self.padded_num_heads < self.num_attention_heads:
            raise ConfigError(
                f"model.vision.padded_num_heads={self.padded_num_heads} is below num_attention_heads={self.num_attention_heads}"
            )
        if self.built_heads % tp:
            raise ConfigError(
                f"model.vision heads ({self.built_heads}) are not divisible by parallel.tensor_model_parallel_size={tp}; "
                f"set model.vision.padded_num_heads to a multiple of {tp} (extra heads are zero) or pick another TP size"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"model.vision.ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        n = self.num_layers
        if not (-n <= self.select_layer < n):
            raise ConfigError(f"model.vision.select_layer={self.select_layer} is outside [-{n}, {n - 1}] for num_layers={n}")


@dataclass
class ProjectorConfig:
    """InternVL connector: pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear."""

    downsample_ratio: float = field_(0.5, "pixel-shuffle ratio (0.5: 2x2 patches -> 1 token, width x4)",
                                     bounds="(0, 1]")
    norm_eps: float = field_(1e-5, "LayerNorm epsilon (torch default, as in InternVL's mlp1)", bounds="(0, 1)")
    freeze: bool = field_(False, "keep the connector's weights fixed")

    def validate(self, root) -> None:
        side = root.model.vision.patches_per_side
        inv = 1.0 / self.downsample_ratio
        if not inv.is_integer() or side % int(inv):
            raise ConfigError(
                f"model.projector.downsample_ratio={self.downsample_ratio}: {side} patches per side must be "
                f"divisible by 1/ratio"
            )


@dataclass
class LLMConfig:
    """Qwen2-style decoder. Defaults: Qwen2.5-0.5B shapes."""

    vocab_size: int = field_(151936, "tokenizer vocabulary (padded for TP at build time)", bounds="[1, inf)")
    hidden_size: int = field_(896, "model width", bounds="[1, inf)")
    ffn_hidden_size: int = field_(4864, "SwiGLU inner width", bounds="[1, inf)")
    num_layers: int = field_(24, "decoder layers", bounds="[1, inf)")
    num_attention_heads: int = field_(14, "query heads", bounds="[1, inf)")
    num_query_groups: int = field_(2, "key/value heads (GQA)", bounds="[1, inf)")
    rope_theta: float = field_(1_000_000.0, "RoPE base", bounds="(0, inf)")
    max_position_embeddings: int = field_(32768, "longest sequence RoPE is built for", bounds="[1, inf)")
    rope_scaling: Literal["none", "dynamic"] = field_(
        "none", "RoPE scaling of the source model; 'dynamic' (dynamic NTK, InternVL3) is plain RoPE up to "
        "max_position_embeddings, so it trains as plain RoPE there and is kept for exports (docs/checkpoints.md)"
    )
    rope_scaling_factor: float = field_(1.0, "the scaling's factor (InternVL3: 2.0); 1.0 without a scaling",
                                        bounds="[1, inf)")
    norm_eps: float = field_(1e-6, "RMSNorm epsilon", bounds="(0, 1)")
    qkv_bias: bool = field_(True, "bias on q/k/v (Qwen2: true)")
    tie_embeddings: bool = field_(False, "share input embedding and output layer")
    make_vocab_size_divisible_by: int = field_(128, "vocab is padded to a multiple of this x TP", bounds="[1, inf)")
    freeze: bool = field_(False, "keep the LLM's weights fixed")

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, root) -> None:
        tp = root.parallel.tensor_model_parallel_size
        pp = root.parallel.pipeline_model_parallel_size
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.llm.hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.llm.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ConfigError(
                    f"model.llm.{name}={getattr(self, name)} is not divisible by "
                    f"parallel.tensor_model_parallel_size={tp}; pick a TP size that divides it"
                )
        if self.num_layers % pp:
            raise ConfigError(
                f"model.llm.num_layers={self.num_layers} is not divisible by "
                f"parallel.pipeline_model_parallel_size={pp}; pick a PP size that divides it"
            )
        if self.num_layers // pp < 1:
            raise ConfigError("each pipeline stage needs at least one LLM layer")
        if self.rope_scaling == "none" and self.rope_scaling_factor != 1.0:
            raise ConfigError(
                f"model.llm.rope_scaling_factor={self.rope_scaling_factor} without a rope_scaling: set "
                "model.llm.rope_scaling (e.g. dynamic) or leave the factor at 1.0"
            )
        if self.rope_scaling == "dynamic":
            if self.rope_scaling_factor < 1.0:
                raise ConfigError(f"model.llm.rope_scaling_factor={self.rope_scaling_factor}: dynamic NTK needs >= 1")
            # transformers rescales the RoPE base for sequences longer than max_position_embeddings; below it
            # dynamic NTK is plain RoPE, which is what the engine computes. train.seq_length is checked in
            # TrainConfig; generated sequences must stay below it too.
            if root.rollout.max_model_len > self.max_position_embeddings:
                raise ConfigError(
                    f"rollout.max_model_len={root.rollout.max_model_len} exceeds model.llm.max_position_embeddings="
                    f"{self.max_position_embeddings}: with rope_scaling=dynamic, longer sequences get a rescaled "
                    "RoPE in transformers that the engine does not compute; lower rollout.max_model_len"
                )


@dataclass
class ModelConfig:
    """The VLM: y = llm(projector(vision(x_v)), x_t)."""

    vision: VisionConfig = field_(factory=VisionConfig, help="vision encoder")
    projector: ProjectorConfig = field_(factory=ProjectorConfig, help="connector")
    llm: LLMConfig = field_(factory=LLMConfig, help="language model")
    image_token_id: int = field_(151667, "id of <IMG_CONTEXT>, the per-embedding image placeholder", bounds="[0, inf)")
    transformer_impl: Literal["auto", "local", "transformer_engine"] = field_(
        "auto", "layer spec: Transformer Engine when importable (auto), or megatron's local spec"
    )
    params_dtype: Literal["float32", "bfloat16", "float16"] = field_("float32", "parameter/compute dtype")
    text_only: bool = field_(False, "build the LLM alone (no vision encoder/connector)")

    @property
    def tokens_per_tile(self) -> int:
        side = self.vision.patches_per_side
        return int(side * self.projector.downsample_ratio) ** 2

    def validate(self, root) -> None:
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ConfigError(f"model.image_token_id={self.image_token_id} is outside the vocabulary (size {self.llm.vocab_size})")
