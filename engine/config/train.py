"""Training-loop sub-config: batch geometry, steps, checkpoints, run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from engine.config.base import ConfigError, field_


@dataclass
class TrainConfig:
    stage: Literal["sft", "align", "iterative_sft", "mpo", "connector", "grpo"] = field_("sft", "training stage")
    seed: int = field_(1234, "global seed (per-rank offsets are derived)", bounds="[0, inf)")
    micro_batch_size: int = field_(1, "sequences per micro-batch per data-parallel rank", bounds="[1, inf)")
    global_batch_size: int = field_(8, "sequences per optimizer step over all data-parallel ranks", bounds="[1, inf)")
    seq_length: int = field_(4096, "tokens per sequence (samples are padded or packed to this)", bounds="[1, inf)")
    max_steps: int = field_(100, "optimizer steps", bounds="[1, inf)")
    log_interval: int = field_(1, "steps between metric lines", bounds="[1, inf)")
    save_interval: int = field_(0, "steps between checkpoints (0: only at the end)", bounds="[0, inf)")
    keep_checkpoints: int = field_(2, "rotate old checkpoints, keeping this many (0: keep all)", bounds="[0, inf)")
    run_dir: str = field_("runs/default", "metrics, TensorBoard and checkpoints go here")
    init_from: str = field_("", "start from these model weights (a checkpoint dir of an earlier stage); ignored on resume")
    init_from_allow: list[str] = field_(
        factory=list, help="model config fields that may differ from init_from's stored config, e.g. "
                           "[model.llm.max_position_embeddings] (others are an error; freeze flags, transformer_impl and "
                           "params_dtype may always differ)")
    loss_impl: Literal["fused", "fused_linear", "reference"] = field_(
        "fused", "token log-prob path: Triton kernel on logits, fused with the output layer (no [T, V] logits), "
        "or torch reference")
    recompute_activations: bool = field_(False, "activation recomputation in the LLM (what: performance.recompute_granularity)")
    fp8: Literal["e4m3", "hybrid"] | None = field_(
        None, "Transformer Engine FP8 GEMMs (hybrid: e4m3 forward, e5m2 gradients); needs TE and bf16 params")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = field_("delayed", "TE FP8 scaling recipe")
    fp8_amax_history_len: int = field_(1024, "delayed scaling: amax history length", bounds="[1, inf)")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = field_("max", "delayed scaling: how the scale uses the history")
    fp8_margin: int = field_(0, "delayed scaling: exponent margin", bounds="[0, inf)")
    max_bad_steps: int = field_(5, "stop (with a checkpoint) after this many non-finite steps in a row",
                                bounds="[1, inf)")
    eval_interval: int = field_(0, "steps between validation-loss evaluations on data.valid_path (0: never)",
                                bounds="[0, inf)")
    eval_batches: int = field_(4, "global batches per evaluation (the same ones every time)", bounds="[1, inf)")
    early_stopping_patience: int = field_(0, "stop when validation loss has not improved for this many evals (0: off)",
                                          bounds="[0, inf)")

    def validate(self, root) -> None:
        if self.stage != "grpo" and self.global_batch_size % self.micro_batch_size:  # GRPO packs rows per episode
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.fp8 is not None:
            from engine.model.specs import resolve_impl, transformer_engine_available

            if not transformer_engine_available():
                raise ConfigError(f"train.fp8={self.fp8} needs Transformer Engine (transformer_engine.pytorch does not "
                                  "import here); install transformer-engine[pytorch] on the GPU nodes or unset train.fp8")
            if resolve_impl(root.model.transformer_impl) != "transformer_engine":
                raise ConfigError("train.fp8 needs model.transformer_impl=transformer_engine (or auto)")
            if root.model.params_dtype != "bfloat16":
                raise ConfigError(f"train.fp8 needs model.params_dtype=bfloat16 (got {root.model.params_dtype})")
        if (self.eval_interval or self.early_stopping_patience) and not root.data.valid_path:
            raise ConfigError("train.eval_interval / train.early_stopping_patience need data.valid_path (a JSONL file)")
        if self.early_stopping_patience and not self.eval_interval:
            raise ConfigError("train.early_stopping_patience needs train.eval_interval > 0")
        for key in self.init_from_allow:
            if not _is_model_field(root.model, key):
                raise ConfigError(f"train.init_from_allow: {key!r} is not a model config field (write e.g. "
                                  "model.llm.rope_theta or model.vision)")
        if self.seq_length > root.model.llm.max_position_embeddings:
            raise ConfigError(
                f"train.seq_length={self.seq_length} exceeds model.llm.max_position_embeddings="
                f"{root.model.llm.max_position_embeddings}"
            )

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_rank = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_rank:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size x data_parallel_size = {self.micro_batch_size} x {data_parallel_size}"
            )
        return self.global_batch_size // per_rank


def _is_model_field(model, key: str) -> bool:
    """Whether `key` ("model.llm.rope_theta", or a section such as "model.vision") names a field of the model tree."""
    parts = key.split(".")
    if parts[0] != "model" or len(parts) < 2:
        return False
    node = model
    for part in parts[1:]:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True
