"""A real byte-level BPE tokenizer trained in-process with the `tokenizers` library (no mocks).

The corpus makes "Wait", " Wait", "wait", "Hmm", " Hmm", " Alternatively" single tokens while
"Alternatively" without a space stays split into A|lt|ernatively — so both cases are exercised.
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "Wait, let me check. Wait the answer is 3. Hmm so wait. Hmm yes. hmm",
    "<think> x </think> Answer: 4",
    "the cat sat on the mat. Alternatively the dog.",
] * 20  # repeated so the frequent words get merged into single tokens


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,  # small enough that "Alternatively" (no space) stays split
        special_tokens=["<think>", "</think>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok
