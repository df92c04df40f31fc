"""Chat template, image-token expansion and the assistant-only learn mask, per format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.data.errors import DataError
from engine.data.formats import Sample, Turn
from engine.data.template import ChatTemplate, ChatTokenizer, fit_length

from data_testutils import TINY_IMAGE_TOKEN_ID, TOKENIZER

TPT = 3  # tokens per tile in these tests (any value works; 3 keeps strings short)


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(TOKENIZER)


def sft(turns, images=0, system=None) -> Sample:
    roles = ["user", "assistant"] * len(turns)
    return Sample(id="s1", where="f.jsonl:7", images=[Path(f"{k}.png") for k in range(images)], system=system,
                  turns=[Turn(r, t) for r, t in zip(roles, turns)])


def learned_text(tok: ChatTokenizer, enc) -> str:
    return tok.decode(enc.tokens[enc.learn])


def test_shipped_tokenizer_loads_offline_with_special_tokens():
    hf = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    vocab = hf.get_vocab()
    assert vocab["<IMG_CONTEXT>"] == TINY_IMAGE_TOKEN_ID and hf.pad_token == "<|endoftext|>"
    for t in ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<think>", "</think>"]:
        assert len(hf.encode(t, add_special_tokens=False)) == 1, t
    text = "<think>\nThe angles add up to 180°.\n</think>\n\nThe answer is \\boxed{42}."
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    assert 500 < len(hf) <= 2100


def test_sft_think_layout_and_mask(tok):
    t = ChatTemplate(tok, TPT, "think", system_prompt="You are helpful.")
    s = sft(["<image>\nHow many?", "<think>\ncount them\n</think>\n\n\\boxed{3}"], images=1)
    enc = t.conversation(s, tiles=[2])
    ctx = "<IMG_CONTEXT>" * (2 * TPT)
    assert tok.decode(enc.tokens) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        f"<|im_start|>user\n<img>{ctx}</img>\nHow many?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ncount them\n</think>\n\n\\boxed{3}<|im_end|>\n"
    )
    assert learned_text(tok, enc) == "count them\n</think>\n\n\\boxed{3}<|im_end|>"
    assert int((enc.tokens == TINY_IMAGE_TOKEN_ID).sum()) == 2 * TPT
    assert not enc.learn[enc.tokens == TINY_IMAGE_TOKEN_ID].any()


def test_no_think_strips_the_trace(tok):
    t = ChatTemplate(tok, TPT, "no_think")
    enc = t.conversation(sft(["hi", "<think>\nhmm\n</think>\n\nhello"]), tiles=[])
    assert tok.decode(enc.tokens) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert learned_text(tok, enc) == "hello<|im_end|>"


def test_multi_turn_multi_image(tok):
    t = ChatTemplate(tok, TPT, "no_think")
    s = sft(["<image> and <image>?", "a", "then <image>", "b"], images=3)
    enc = t.conversation(s, tiles=[1, 2, 5])
    text = tok.decode(enc.tokens)
    assert text.count("<img>") == 3 and int((enc.tokens == TINY_IMAGE_TOKEN_ID).sum()) == (1 + 2 + 5) * TPT
    assert learned_text(tok, enc) == "a<|im_end|>b<|im_end|>"
    # images appear in the order of their placeholders: 1 tile, 2 tiles, then 5
    runs = [len(r) for r in text.split("</img>")[:-1]]
    assert [r.split("<img>")[1].count("<IMG_CONTEXT>") for r in text.split("</img>")[:-1]] == [TPT, 2 * TPT, 5 * TPT]
    assert len(runs) == 3


def test_think_mode_needs_a_trace(tok):
    with pytest.raises(DataError, match="f.jsonl:7") as e:
        ChatTemplate(tok, TPT, "think").conversation(sft(["q", "just the answer"]), tiles=[])
    assert e.value.reason == "missing_think"


def test_reserved_tokens_in_text_are_rejected(tok):
    with pytest.raises(DataError) as e:
        ChatTemplate(tok, TPT, "no_think").conversation(sft(["sneaky <IMG_CONTEXT>", "a"]), tiles=[])
    assert e.value.reason == "reserved_token"


def test_rl_prompt_and_preference(tok):
    t = ChatTemplate(tok, TPT, "think")
    s = Sample(id="r", where="r.jsonl:1", images=[Path("a.png")], turns=[Turn("user", "<image>\nQ?")])
    prompt = t.generation_prompt(s, tiles=[1])
    assert tok.decode(prompt.tokens).endswith("Q?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt.learn.any()
    chosen = t.with_response(prompt, "<think>\nok\n</think>\n\n\\boxed{1}", s)
    assert np.array_equal(chosen.tokens[: len(prompt)], prompt.tokens)
    assert learned_text(tok, chosen) == "ok\n</think>\n\n\\boxed{1}<|im_end|>"


def test_fit_length(tok):
    t = ChatTemplate(tok, TPT, "no_think")
    s = sft(["<image>\nq", "a long answer " * 20], images=1)
    enc = t.conversation(s, tiles=[1])
    with pytest.raises(DataError) as e:
        fit_length(enc, 30, False, s, TINY_IMAGE_TOKEN_ID)
    assert e.value.reason == "too_long" and "train.seq_length=30" in str(e.value)
    cut = fit_length(enc, 30, True, s, TINY_IMAGE_TOKEN_ID)
    assert len(cut) == 30 and cut.truncated and np.array_equal(cut.tokens, enc.tokens[:30])
    with pytest.raises(DataError, match="cut an image"):
        fit_length(enc, 8, True, s, TINY_IMAGE_TOKEN_ID)
