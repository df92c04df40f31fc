"""The rollout engine interface: prompts (+ images) in, sampled tokens with their log-probs out.

Callers never branch on the backend: a request carries its images in both forms (`ImageInputs`) and the
engine takes the one it uses; `close()` releases whatever the backend holds; `stop_token_ids` is the one
place the stop ids come from.

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
from typing import Any, Callable, Iterable, Iterator, Literal

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
class ImageInputs:
    """One prompt's images in both forms the engines take, so callers never choose: the files (vLLM
    re-tiles PIL images with its own processor) and our image pipeline's tiles (the native engine; the
    trainer uses the same tiles). `tiles` is the (n_tiles, 3, H, W) tensor, or a function that makes it,
    called only by an engine that needs tiles (distillation decodes images for the native engine only)."""

    paths: list[str]
    tiles: torch.Tensor | Callable[[], torch.Tensor]

    def pil(self) -> list[Any]:
        from PIL import Image

        return [Image.open(p).convert("RGB") for p in self.paths]

    def pixel_tiles(self) -> torch.Tensor:
        return self.tiles if isinstance(self.tiles, torch.Tensor) else self.tiles()


@dataclass
class GenerationRequest:
    """One prompt, as our chat template writes it: each image expanded to `<img><IMG_CONTEXT>*N</img>`
    (N = tiles x tokens per tile). `images`: `ImageInputs` (both forms; the engine picks the one it
    takes), or PIL images (vLLM, which re-tiles them itself and gets the prompt with each run collapsed
    to one `<IMG_CONTEXT>`; native with an `image_processor`), or pixel tiles (n_tiles, 3, H, W) for the
    native engine, whose N must match them."""

    prompt_token_ids: list[int]
    images: ImageInputs | list[Any] | torch.Tensor | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id or ''}: empty prompt; give at least one token id")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token (see the module docstring); 0.0 at forced tokens
    finish_reason: FinishReason
    text: str | None = None
    forced: list[bool] | None = None  # per token: put there by the decoding plan (thinking budget), not sampled

    def sampled(self) -> list[bool]:
        """Per token: True where the policy sampled it (every token unless a decoding plan forced some)."""
        return [not f for f in self.forced] if self.forced is not None else [True] * len(self.token_ids)


@dataclass
class GenerationResult:
    request_id: str | None
    prompt_token_ids: list[int]
    completions: list[Completion]  # `n` samples


@dataclass
class WeightPush:
    """What one `update_weights` moved and how long it took."""

    seconds: float
    bytes: int = 0        # payload handed to the engine (0: the engine generates with the training model itself)
    tensors: int = 0
    buckets: int = 0
    largest_bucket_bytes: int = 0


class RolloutEngine(ABC):
    """generate / update_weights / sleep / wake / close. Collective where the backend is distributed: every
    rank of the engine's group calls each method with the same arguments (its own requests for generate)."""

    tokenizer: Any = None

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        ...

    @abstractmethod
    def update_weights(self, weights: "Iterable[tuple[str, torch.Tensor]] | torch.nn.Module") -> WeightPush:
        """Load new weights: our megatron model (sharded; streamed) or an iterator of HF-named tensors."""

    @abstractmethod
    def sleep(self) -> None:
        """Free rollout memory for training (weights offloaded, KV cache dropped) where supported."""

    @abstractmethod
    def wake(self) -> None:
        ...

    def close(self) -> None:
        """Release what the engine holds beyond memory (vLLM: its process groups, before the training world
        goes away). Collective; call once after the last generate(). Idempotent."""

    def decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a response: the chat turn end `<|im_end|>` and the tokenizer's EOS. Ids a tokenizer
    does not have (None, or negative / unknown ids some tokenizers return) are left out."""
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    unk = getattr(tokenizer, "unk_token_id", None)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")


def image_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the image placeholder tokens the tokenizer has: a response must never emit them."""
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in IMAGE_TOKENS if t in vocab}


def requests_from_prompts(batch: dict) -> list[GenerationRequest]:
    """A collate_rl batch (engine/data/batch.py) -> one request per prompt, carrying both image forms."""
    tiles_per = batch["tiles_per_row"].tolist()
    start, requests = 0, []
    for i, ids in enumerate(batch["prompt_ids"]):
        tiles = batch["pixel_values"][start: start + tiles_per[i]]  # (n_tiles, 3, H, W) of prompt i
        start += tiles_per[i]
        images = ImageInputs(list(batch["image_paths"][i]), tiles) if tiles_per[i] else None
        requests.append(GenerationRequest(list(ids), images=images, request_id=batch["sample_ids"][i][0]))
    return requests


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
