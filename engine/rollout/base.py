"""The rollout engine interface: prompts (+ images) in, sampled tokens with their log-probs out.

Two implementations sit behind it (chosen by `rollout.backend`):
    native   engine.rollout.native.NativeRolloutEngine   our megatron VLM + a KV cache (exactness reference)
    vllm     engine.rollout.vllm_engine.VLLMRolloutEngine  a colocated vllm.LLM fed by weight pushes

Both return, per request and sample, the generated token ids and each sampled token's log-prob under
the model's *raw* distribution: log_softmax of the logits before temperature, penalties, logit bias and
top-k/top-p (vLLM's default `logprobs_mode="raw_logprobs"`; TP padding columns excluded). That is what
the trainer recomputes at temperature 1, so the two can be compared token by token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass; 1: off
    top_k: int = -1  # -1: off
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)  # the stop token is kept in the output
    repetition_penalty: float = 1.0  # HF/CTRL rule over prompt + generated ids; 1: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # id -> added bias; -inf bans the id
    seed: int | None = None  # None: the engine's generator state
    n: int = 1  # samples per prompt

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}: use -1 (off) or a positive count")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        for tid, bias in self.logit_bias.items():
            if math.isnan(bias) or bias == math.inf:
                raise ValueError(f"logit_bias[{tid}]={bias}: use a finite value or -inf (ban)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    """One prompt, as our chat template writes it: each image expanded to `<img><IMG_CONTEXT>*N</img>`
    (N = tiles x tokens per tile). `images`: PIL images (vLLM, which re-tiles them itself and gets the
    prompt with each run collapsed to one `<IMG_CONTEXT>`; native with an `image_processor`) or pixel
    tiles (n_tiles, 3, H, W) for the native engine, whose N must match them."""

    prompt_token_ids: list[int]
    images: list[Any] | torch.Tensor | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id or ''}: empty prompt; give at least one token id")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token (see the module docstring)
    finish_reason: FinishReason
    text: str | None = None


@dataclass
class GenerationResult:
    request_id: str | None
    prompt_token_ids: list[int]
    completions: list[Completion]  # `n` samples


class RolloutEngine(ABC):
    """generate / update_weights / sleep / wake. Collective where the backend is distributed: every rank
    of the engine's group calls each method with the same arguments (its own requests for generate)."""

    tokenizer: Any = None

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        ...

    @abstractmethod
    def update_weights(self, weights: "Iterable[tuple[str, torch.Tensor]] | torch.nn.Module") -> dict:
        """Load new weights: our megatron model (sharded; streamed) or an iterator of HF-named tensors.
        Returns timing/size stats."""

    @abstractmethod
    def sleep(self) -> None:
        """Free rollout memory for training (weights offloaded, KV cache dropped) where supported."""

    @abstractmethod
    def wake(self) -> None:
        ...

    def decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)


def check_stop_reason(token: int, n_generated: int, params: SamplingParams) -> FinishReason | None:
    if token in params.stop_token_ids:
        return "stop"
    if n_generated >= params.max_tokens:
        return "length"
    return None


def iter_named(weights) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(weights, dict):
        return iter(weights.items())
    return iter(weights)
