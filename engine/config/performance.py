"""Performance switches: how fast and in how much memory, never what is computed.

Every switch reaches megatron (TransformerConfig / DistributedDataParallelConfig, see
engine/model/transformer_configs.py and engine/parallel/wrap.py). `null` means automatic: on where it is
safe on a GPU, off on the CPU; `resolve()` turns the section into plain booleans for the machine at hand.
Asking for a switch the machine cannot do is an error at config load that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_

# megatron-core 0.16.1 TransformerConfig.recompute_modules choices for a dense (non-MoE, non-MLA) model
DENSE_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


@dataclass(frozen=True)
class ResolvedPerformance:
    """The switches as booleans for this machine (what is handed to megatron)."""

    cpu_initialization: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    gradient_accumulation_fusion: bool
    bias_activation_fusion: bool
    rope_fusion: bool
    recompute_granularity: str | None  # None, "selective" or "full"
    recompute_modules: tuple[str, ...]
    recompute_vision: bool


@dataclass
class PerformanceConfig:
    cpu_initialization: bool | None = field_(
        None, "build weights as full CPU tensors, then split for TP (the same model at every TP size; slow and "
              "host-memory hungry at 38B); null: only without CUDA (on a GPU each rank builds its shard there)")
    overlap_grad_reduce: bool | None = field_(
        None, "overlap the data-parallel gradient reduce with the backward pass (megatron DDP buckets); "
              "null: on with CUDA")
    overlap_param_gather: bool = field_(
        False, "overlap the distributed optimizer's parameter all-gather with the next forward; off by default: "
               "parameters are then stale between optimizer.step and the next forward (checkpoint save, reference "
               "copy, rollout weight push read them there)")
    gradient_accumulation_fusion: bool | None = field_(
        None, "fuse the weight-gradient GEMM with the fp32 main_grad accumulation (Transformer Engine linears); "
              "null: on with CUDA and the Transformer Engine layer spec")
    bias_activation_fusion: bool | None = field_(
        None, "megatron's fused bias+SwiGLU (LLM) and bias+GELU (ViT) kernels; null: on with CUDA")
    rope_fusion: bool | None = field_(
        None, "Transformer Engine's fused RoPE kernel (bshd and packed thd); null: on with CUDA and Transformer Engine")
    recompute_granularity: Literal["selective", "full"] = field_(
        "selective", "what train.recompute_activations recomputes: selective (the modules listed in "
                     "recompute_modules) or full (whole layers: least memory, ~33% more compute)")
    recompute_modules: list[str] = field_(
        factory=lambda: ["mlp"], help="selective recompute: megatron modules to recompute (core_attn, layernorm, mlp); "
                                      "mlp holds the largest activations of a dense layer, core_attn is pointless with "
                                      "flash/SDPA attention (it keeps no [s, s] scores)")
    recompute_vision: bool = field_(False, "recompute each vision-encoder block in the backward pass")

    def resolve(self, root, cuda: bool | None = None) -> ResolvedPerformance:
        """Concrete switches for a machine with (cuda=True) or without a GPU; default: this machine."""
        from engine.model.specs import resolve_impl

        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        te = resolve_impl(root.model.transformer_impl) == "transformer_engine"

        def pick(value: bool | None, auto: bool) -> bool:
            return auto if value is None else value

        recompute = root.train.recompute_activations
        return ResolvedPerformance(
            cpu_initialization=pick(self.cpu_initialization, not cuda),
            overlap_grad_reduce=pick(self.overlap_grad_reduce, cuda),
            overlap_param_gather=self.overlap_param_gather,
            gradient_accumulation_fusion=pick(self.gradient_accumulation_fusion, cuda and te),
            bias_activation_fusion=pick(self.bias_activation_fusion, cuda),
            rope_fusion=pick(self.rope_fusion, cuda and te),
            recompute_granularity=self.recompute_granularity if recompute else None,
            recompute_modules=tuple(self.recompute_modules),
            recompute_vision=self.recompute_vision,
        )

    def validate(self, root) -> None:
        from engine.model.specs import resolve_impl

        te = resolve_impl(root.model.transformer_impl) == "transformer_engine"
        if self.gradient_accumulation_fusion and not te:
            raise ConfigError(
                "performance.gradient_accumulation_fusion=true needs the Transformer Engine layer spec "
                "(megatron's local linears need apex's fused_weight_gradient_mlp_cuda, which this engine does not "
                "use); set model.transformer_impl=transformer_engine on a GPU node or unset the switch")
        if self.rope_fusion and not te:
            raise ConfigError("performance.rope_fusion=true needs Transformer Engine (its fused RoPE kernel); "
                              "unset it or use model.transformer_impl=transformer_engine on a GPU node")
        if self.overlap_param_gather:
            if root.train.stage == "grpo":
                raise ConfigError("performance.overlap_param_gather=true is not for train.stage=grpo: the rollout "
                                  "weight push reads the parameters right after the optimizer step, before the next "
                                  "forward gathers them")
            if not root.parallel.use_distributed_optimizer:
                raise ConfigError("performance.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
            if self.overlap_grad_reduce is False:
                raise ConfigError("performance.overlap_param_gather=true needs performance.overlap_grad_reduce "
                                  "(true or null)")
        bad = set(self.recompute_modules) - set(DENSE_RECOMPUTE_MODULES)
        if bad:
            raise ConfigError(f"performance.recompute_modules: {sorted(bad)} are not recompute modules of a dense "
                              f"layer; choose from {list(DENSE_RECOMPUTE_MODULES)}")
        if self.recompute_granularity == "selective" and root.train.recompute_activations and not self.recompute_modules:
            raise ConfigError("train.recompute_activations=true with performance.recompute_granularity=selective needs "
                              "at least one performance.recompute_modules entry")
