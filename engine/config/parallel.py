"""Parallel layout sub-config. Data parallel size is what is left of the world."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.base import ConfigError, field_


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field_(1, "TP: splits heads / MLP / vocab across ranks", bounds="[1, inf)")
    pipeline_model_parallel_size: int = field_(1, "PP: splits LLM layers into stages (vision on stage 0)",
                                               bounds="[1, inf)")
    sequence_parallel: bool = field_(False, "megatron sequence parallel (needs TP > 1 and Transformer Engine or apex norms)")
    use_distributed_optimizer: bool = field_(True, "shard optimizer state across data-parallel ranks")
    backend: str = field_("auto", "torch.distributed backend: auto (nccl with CUDA, else gloo), nccl or gloo")

    def validate(self, root) -> None:
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r}: use auto, nccl or gloo")
