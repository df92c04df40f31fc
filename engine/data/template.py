"""Qwen2 / Skywork-R1V chat template -> token ids + a per-token "learn" mask.

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text with <img><IMG_CONTEXT>*N</img> per image}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}</think>\\n\\n{answer}<|im_end|>\\n

thinking="think" (R1V slow thinking): '<think>\\n' belongs to the prompt (the generation prompt opens
it), so the model learns the reasoning, '</think>', the answer and '<|im_end|>'. thinking="no_think":
no '<think>' in the prompt and any <think>...</think> block is removed from the answer.
Only assistant tokens are learned (mask 1): the answer text and its '<|im_end|>', never the tags,
the system prompt, the user turn or image tokens. N = tiles_of_the_image * tokens_per_tile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.errors import DataError
from engine.data.formats import IMAGE_PLACEHOLDER, Sample

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
THINK_START, THINK_END = "<think>", "</think>"
REQUIRED_TOKENS = (IM_START, IM_END, PAD, IMG_START, IMG_END, IMG_CONTEXT)
# Single tokens in R1V / R1-distill tokenizers; plain text (several tokens) in tokenizers without them.
OPTIONAL_TOKENS = (THINK_START, THINK_END)
# Text must never smuggle these in: they would break turn structure or the image-token count.
RESERVED_IN_TEXT = (IM_START, IM_END, PAD, IMG_START, IMG_END, IMG_CONTEXT)
REPO_ROOT = Path(__file__).resolve().parents[2]
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class ChatTokenizer:
    """A local HF tokenizer directory (AutoTokenizer, offline) + the ids the template needs."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
            path = REPO_ROOT / path  # relative paths such as the default assets/tiny_tokenizer work from anywhere
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"no tokenizer in {path}; set data.tokenizer_path to a local HF tokenizer directory")
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.path = path
        vocab = self.hf.get_vocab()
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}; add them (see docs/data.md)")
        self.ids = {t: vocab[t] for t in REQUIRED_TOKENS + OPTIONAL_TOKENS if t in vocab}
        self.pad_id = self.ids[PAD]
        self.image_token_id = self.ids[IMG_CONTEXT]
        self.vocab_size = len(self.hf)
        self._nl = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False) if text else []

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


@dataclass
class Encoded:
    """One templated sequence. `learn[i]` = token i is an assistant token the model must predict."""

    tokens: np.ndarray  # int64 [L]
    learn: np.ndarray  # bool [L]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


class Builder:
    """Collects (ids, learn) pieces."""

    def __init__(self):
        self.ids: list[int] = []
        self.learn: list[bool] = []

    def add(self, ids: list[int], learn: bool = False) -> None:
        self.ids.extend(ids)
        self.learn.extend([learn] * len(ids))

    def done(self) -> Encoded:
        return Encoded(np.asarray(self.ids, dtype=np.int64), np.asarray(self.learn, dtype=bool))


class ChatTemplate:
    def __init__(self, tok: ChatTokenizer, tokens_per_tile: int, thinking: str = "think", system_prompt: str = ""):
        if thinking not in ("think", "no_think"):
            raise ValueError(f"thinking={thinking!r}: use 'think' or 'no_think'")
        self.tok = tok
        self.tokens_per_tile = tokens_per_tile
        self.thinking = thinking
        self.system_prompt = system_prompt
        s = tok.ids
        self._start, self._end = [s[IM_START]], [s[IM_END]]
        self._img_start, self._img_end, self._ctx = s[IMG_START], s[IMG_END], s[IMG_CONTEXT]
        self._think_open = tok.encode(THINK_START + "\n")  # one token + newline when <think> is in the vocabulary

    # -- pieces -------------------------------------------------------------------------------------
    def _header(self, b: Builder, role: str) -> None:
        b.add(self._start + self.tok.encode(f"{role}\n"))

    def _check_text(self, text: str, sample: Sample) -> None:
        for t in RESERVED_IN_TEXT:
            if t in text:
                raise DataError("reserved_token", f"sample {sample.id}: text contains the reserved token {t}", sample.where)

    def _user(self, b: Builder, text: str, tiles: list[int], next_image: int, sample: Sample) -> int:
        self._check_text(text, sample)
        self._header(b, "user")
        parts = text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            b.add(self.tok.encode(part))
            if k < len(parts) - 1:
                n = tiles[next_image] * self.tokens_per_tile
                b.add([self._img_start] + [self._ctx] * n + [self._img_end])
                next_image += 1
        b.add(self._end + self.tok._nl)
        return next_image

    def _answer_text(self, text: str, sample: Sample) -> str:
        self._check_text(text, sample)
        if self.thinking == "no_think":
            return _THINK_BLOCK.sub("", text).strip() or text.strip()
        body = text.lstrip()
        if body.startswith(THINK_START):
            body = body[len(THINK_START) :].lstrip("\n")
        if THINK_END not in body:
            raise DataError(
                "missing_think",
                f"sample {sample.id}: thinking=think needs a '<think>...</think>' reasoning trace in every "
                "assistant answer; add one or set data.thinking=no_think",
                sample.where,
            )
        return body

    def _assistant_prompt(self, b: Builder) -> None:
        self._header(b, "assistant")
        if self.thinking == "think":
            b.add(self._think_open)

    def _assistant(self, b: Builder, text: str, sample: Sample) -> None:
        self._assistant_prompt(b)
        b.add(self.tok.encode(self._answer_text(text, sample)) + self._end, learn=True)
        b.add(self.tok._nl)

    def _prompt(self, b: Builder, sample: Sample, tiles: list[int]) -> int:
        """System turn (the sample's own, else data.system_prompt); returns the next image index."""
        system = sample.system if sample.system is not None else self.system_prompt
        if system:
            self._check_text(system, sample)
            self._header(b, "system")
            b.add(self.tok.encode(system) + self._end + self.tok._nl)
        return 0

    # -- formats ------------------------------------------------------------------------------------
    def conversation(self, sample: Sample, tiles: list[int]) -> Encoded:
        """SFT: the whole conversation; every assistant turn is learned."""
        b = Builder()
        img = self._prompt(b, sample, tiles)
        for turn in sample.turns:
            if turn.role == "user":
                img = self._user(b, turn.text, tiles, img, sample)
            else:
                self._assistant(b, turn.text, sample)
        return b.done()

    def generation_prompt(self, sample: Sample, tiles: list[int]) -> Encoded:
        """RL / preference prompt: system + user turn + the assistant tag (and '<think>\\n' in think mode)."""
        b = Builder()
        img = self._prompt(b, sample, tiles)
        for turn in sample.turns:  # preference / rl samples hold the user prompt only
            img = self._user(b, turn.text, tiles, img, sample)
        self._assistant_prompt(b)
        return b.done()

    def with_response(self, prompt: Encoded, response: str, sample: Sample) -> Encoded:
        """Preference: prompt + one response (chosen or rejected), the response learned."""
        ids = self.tok.encode(self._answer_text(response, sample)) + self._end
        return Encoded(
            np.concatenate([prompt.tokens, np.asarray(ids, dtype=np.int64)]),
            np.concatenate([prompt.learn, np.ones(len(ids), dtype=bool)]),
        )


def fit_length(enc: Encoded, seq_length: int, truncate: bool, sample: Sample, image_token_id: int) -> Encoded:
    """Enforce len <= seq_length: cut text after the last image (truncate=True) or raise `too_long`."""
    if len(enc) <= seq_length:
        return enc
    hint = "raise train.seq_length, lower data.max_tiles, or shorten the sample"
    if not truncate:
        raise DataError("too_long", f"sample {sample.id} has {len(enc)} tokens > train.seq_length={seq_length}; {hint} "
                        "(or set data.truncate=true)", sample.where)
    image_pos = np.flatnonzero(enc.tokens == image_token_id)
    if len(image_pos) and image_pos[-1] + 2 > seq_length:  # +2: the last image token and its </img>
        raise DataError("too_long", f"sample {sample.id}: cutting at {seq_length} tokens would cut an image; {hint}",
                        sample.where)
    learn = enc.learn[:seq_length].copy()
    if not learn.any():
        raise DataError("too_long", f"sample {sample.id}: nothing to learn remains after cutting at {seq_length}; {hint}",
                        sample.where)
    return Encoded(enc.tokens[:seq_length].copy(), learn, truncated=True)
