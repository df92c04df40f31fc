"""Parallel layout sub-config. Data parallel size is what is left of the world."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config.base import ConfigError, field_


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field_(1, "TP: splits heads / MLP / vocab across ranks", bounds="[1, inf)")
    pipeline_model_parallel_size: int = field_(1, "PP: splits LLM layers into stages (vision on stage 0)",
                                               bounds="[1, inf)")
    virtual_pipeline_model_parallel_size: int = field_(
        1, "virtual pipeline stages per PP rank (interleaved 1F1B: each rank holds this many LLM layer chunks)",
        bounds="[1, inf)")
    sequence_parallel: bool = field_(
        False, "megatron sequence parallel: LLM activations outside attention/MLP split over TP ranks along the sequence "
               "(needs TP > 1; the ViT and the image merge run on the full sequence, then it is scattered)")
    use_distributed_optimizer: bool = field_(True, "shard optimizer state across data-parallel ranks")
    backend: str = field_("auto", "torch.distributed backend: auto (nccl with CUDA, else gloo), nccl or gloo")

    def validate(self, root) -> None:
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
        if self.sequence_parallel and root.train.seq_length % self.tensor_model_parallel_size:
            raise ConfigError(f"parallel.sequence_parallel=true splits train.seq_length={root.train.seq_length} over "
                              f"TP={self.tensor_model_parallel_size} ranks: make seq_length a multiple of it")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp > 1:
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError("parallel.virtual_pipeline_model_parallel_size > 1 needs "
                                  "parallel.pipeline_model_parallel_size >= 2 (it interleaves pipeline stages)")
            layers = root.model.llm.num_layers
            if layers % (self.pipeline_model_parallel_size * vpp):
                raise ConfigError(f"model.llm.num_layers={layers} is not divisible by PP x virtual stages = "
                                  f"{self.pipeline_model_parallel_size} x {vpp}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend={self.backend!r}: use auto, nccl or gloo")
