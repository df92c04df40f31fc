"""Fixes for megatron-core 0.16.1 bugs that are not about CUDA (so they are not in cpu_compat).

1. DistributedOptimizer + torch's Adam (used when neither Apex nor Transformer Engine is installed):
   loading a `fully_reshardable` checkpoint fails with KeyError 'step' in
   `_set_main_param_and_optimizer_states`, because torch Adam keeps a per-parameter `step` state that
   the checkpoint stores in the param groups instead (and `load_state_dict` has already restored it).
   The fix passes the existing `step` through unchanged. No-op for Apex/TE FusedAdam (no `step` state).
2. `tensor_parallel.CheckpointWithoutOutput(fp8=False)` sets `self.fp8 = fp8 is not None`, i.e. True, and then
   calls Transformer Engine's FP8GlobalStateManager: selective recompute of "layernorm" fails with a NameError
   whenever TE is not installed. The fix reads the flag as `bool(fp8)` (TransformerLayer passes no argument).
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    from megatron.core.tensor_parallel import random as mrandom

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def checkpoint_without_output_init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8)

    mrandom.CheckpointWithoutOutput.__init__ = checkpoint_without_output_init
    _APPLIED = True
