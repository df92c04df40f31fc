"""Rollout sub-config: which generation backend and its memory. Sampling parameters belong to the caller
(GRPO: algorithm.grpo; evaluation: tools/evaluate.py flags), so they are not duplicated here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class RolloutConfig:
    backend: Literal["native", "vllm"] = field_(
        "vllm", "generation backend: vllm (colocated vllm.LLM, the default) or native (our megatron model + KV cache)"
    )
    tensor_parallel_size: int = field_(1, "vLLM tensor parallel size (must divide the world size); native uses the training TP",
                                       bounds="[1, inf)")
    kv_cache_bytes: int = field_(
        256 << 20, "vLLM KV-cache size in bytes (always set: unset, vLLM-CPU takes ~10 GiB); 256 MiB fits the tiny demo",
        bounds="[1, inf)")
    max_model_len: int = field_(4096, "longest prompt + response, in tokens (vLLM max_model_len and the native cache length)",
                                bounds="[1, inf)")
    max_num_seqs: int = field_(256, "most sequences vLLM schedules at once", bounds="[1, inf)")
    sleep_mode: bool = field_(
        True, "offload vLLM weights and drop its KV cache during training (GPU only; a logged no-op where unsupported)"
    )
    weight_push_bucket_bytes: int = field_(
        256 << 20, "weight push: HF tensors are gathered over TP and streamed into vLLM in buckets of about this size",
        bounds="[1, inf)")
    model_dir: str = field_("", "where the HF-format model for vLLM is written once (empty: <train.run_dir>/rollout_hf)")
    dtype: Literal["float32", "bfloat16", "float16"] = field_("bfloat16", "vLLM compute dtype (the CPU demo uses float32)")
    seed: int = field_(0, "sampling seed (per-request seeds come on top)", bounds="[0, inf)")

    def validate(self, root) -> None:
        for name in ("tensor_parallel_size", "kv_cache_bytes", "max_model_len", "max_num_seqs",
                     "weight_push_bucket_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        grpo = getattr(getattr(root, "algorithm", None), "grpo", None)
        if grpo is not None and root.train.stage == "grpo" and grpo.max_response_length >= self.max_model_len:
            raise ConfigError(
                f"algorithm.grpo.max_response_length={grpo.max_response_length} leaves no room for a prompt in "
                f"rollout.max_model_len={self.max_model_len}; raise max_model_len or lower max_response_length"
            )
        world_tp = getattr(getattr(root, "parallel", None), "tensor_model_parallel_size", 1)
        if self.backend == "native" and self.tensor_parallel_size not in (1, world_tp):
            raise ConfigError(
                f"rollout.tensor_parallel_size={self.tensor_parallel_size} with backend=native: the native engine "
                f"runs at the training TP ({world_tp}); leave tensor_parallel_size at 1 or use backend=vllm"
            )
