"""The LLM's output layer in "hidden states" mode, for a loss fused with it (train.loss_impl=fused_linear).

megatron-core 0.16.1's GPTModel ends with `logits, _ = self.output_layer(hidden, weight=output_weight)`
(a ColumnParallelLinear) on the last pipeline stage and returns `logits.transpose(0, 1)`, (b, s, V/tp).
A fused-linear loss (kernels/fused_linear_*.py) multiplies the hidden states by the output weight
itself, chunk by chunk, so the model must hand it the final hidden states, (b, s, h), instead.

`emit_hidden_states(model)` switches the class of the model's existing output layer to a subclass whose
forward returns its input: the same module object, parameters, state-dict keys and
`sharded_state_dict` (checkpoints are interchangeable between loss impls), nothing re-initialised, and
GPTModel itself untouched. The loss takes the weight the output layer would have used from
`output_weight(model)`: the tied word embedding (first stage) or the output layer's own TP shard.
`logits_output(model)` switches back for a block (e.g. to generate with the same model).

Gradient contract: with tensor parallelism the hidden states are replicated over TP, and the
fused-linear kernels return their full gradient on every rank (they all-reduce it), so the layer
passes them through without megatron's `copy_to_tensor_model_parallel_region` (which would reduce
again). Under sequence parallelism it all-gathers the sequence shards, and its backward keeps this
rank's slice of the (already complete) gradient: `tensor_parallel_output_grad=False`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


class HiddenStatesOutputLayer(ColumnParallelLinear):
    """A ColumnParallelLinear that returns its input (the final hidden states) instead of logits."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        """input_ (s, b, h) [(s/tp, b, h) under sequence parallel] -> ((s, b, h), None)."""
        if self.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return input_, None


def language_model(model):
    """The megatron GPTModel inside `model` (DDP wrapper -> VLM -> GPTModel, or a GPTModel)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "llm", model)


def emit_hidden_states(model) -> bool:
    """Make the model return final hidden states (b, s, h) instead of logits. False on a pipeline stage
    without the output layer (its output is hidden states anyway)."""
    llm = language_model(model)
    if not llm.post_process:
        return False
    layer = llm.output_layer
    if isinstance(layer, HiddenStatesOutputLayer):
        return True
    if type(layer) is not ColumnParallelLinear:
        raise TypeError(f"train.loss_impl=fused_linear expects megatron's ColumnParallelLinear as the LLM's output "
                        f"layer, found {type(layer).__name__}; use train.loss_impl=fused.")
    if layer.config.defer_embedding_wgrad_compute:
        raise ValueError("train.loss_impl=fused_linear computes the output weight's gradient inside the loss; "
                         "it cannot be combined with defer_embedding_wgrad_compute. Use train.loss_impl=fused.")
    layer.__class__ = HiddenStatesOutputLayer
    return True


def emit_logits(model) -> None:
    """Undo `emit_hidden_states`: the model returns vocab-parallel logits again."""
    llm = language_model(model)
    if llm.post_process and isinstance(llm.output_layer, HiddenStatesOutputLayer):
        llm.output_layer.__class__ = ColumnParallelLinear


def emits_hidden_states(model) -> bool:
    llm = language_model(model)
    return bool(llm.post_process) and isinstance(llm.output_layer, HiddenStatesOutputLayer)


@contextmanager
def logits_output(model):
    """Within the block the model returns logits, whatever its mode outside."""
    hidden = emits_hidden_states(model)
    emit_logits(model)
    try:
        yield model
    finally:
        if hidden:
            emit_hidden_states(model)


def output_weight(model) -> torch.Tensor | None:
    """The [V_padded/tp, h] weight the output layer multiplies by on this stage (tied: the word
    embedding), or None on a stage without the output layer."""
    llm = language_model(model)
    if not llm.post_process:
        return None
    if llm.share_embeddings_and_output_weights:  # exactly GPTModel._postprocess's choice
        return llm.shared_embedding_or_output_weight()
    return llm.output_layer.weight
