"""Triton kernels for the loss path: fused log-prob/entropy and fused clipped GRPO loss, from logits or
fused with the output layer (from hidden states and the output weight, never materialising [T, V]), and the
one GRPO loss aggregation (kernels/aggregation.py, plain torch).

Importing this package on a machine without CUDA switches Triton to its CPU interpreter
(see kernels/_triton_env.py), so the same calls work in CPU tests and in the CPU engine.
"""

from kernels._triton_env import INTERPRET
from kernels.aggregation import AGGREGATION_MODES, aggregate_loss, aggregate_terms
from kernels.fused_linear_grpo_loss import fused_linear_grpo_loss
from kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy
from kernels.grpo_loss import fused_grpo_loss
from kernels.logprob_entropy import fused_logprob_entropy
from kernels.reference import (
    IGNORE_INDEX,
    KL_TYPES,
    grpo_loss_reference,
    grpo_token_loss_reference,
    kl_estimate_reference,
    linear_grpo_loss_reference,
    linear_logprob_entropy_reference,
    logprob_entropy_reference,
    output_layer_logits_reference,
)

__all__ = [
    "AGGREGATION_MODES",
    "IGNORE_INDEX",
    "INTERPRET",
    "KL_TYPES",
    "aggregate_loss",
    "aggregate_terms",
    "fused_grpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_logprob_entropy",
    "fused_logprob_entropy",
    "grpo_loss_reference",
    "grpo_token_loss_reference",
    "kl_estimate_reference",
    "linear_grpo_loss_reference",
    "linear_logprob_entropy_reference",
    "logprob_entropy_reference",
    "output_layer_logits_reference",
]
