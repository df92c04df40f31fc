"""Rollout engines behind one interface (see docs/rollout.md): native (megatron + KV cache) and vLLM."""

from engine.rollout.base import Completion, GenerationRequest, GenerationResult, RolloutEngine, SamplingParams

__all__ = ["Completion", "GenerationRequest", "GenerationResult", "RolloutEngine", "SamplingParams"]
