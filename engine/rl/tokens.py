"""Token ids of words in every surface form a tokenizer may emit them in (used by NoWait
banning and by critical-token entropy). Works with a `tokenizers.Tokenizer` or a transformers tokenizer."""

from __future__ import annotations

from typing import Any, Iterable, Literal

MultiTokenPolicy = Literal["auto", "first", "all", "skip"]


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` without special tokens (BOS etc.)."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def word_variants(word: str) -> list[str]:
    """'Wait' -> Wait, wait (and Capitalised) forms, each with and without a leading space."""
    forms = dict.fromkeys([word, word.lower(), word.capitalize()])  # ordered, deduplicated
    return [f"{space}{form}" for form in forms for space in ("", " ")]


def _first_visible(tokenizer: Any, pieces: list[int]) -> int | None:
    """First piece that decodes to something other than whitespace (skips a lone 'Ġ' space token)."""
    for piece in pieces:
        if tokenizer.decode([piece]).strip():
            return piece
    return None


def word_token_ids(tokenizer: Any, words: Iterable[str], multi_token: MultiTokenPolicy = "auto") -> set[int]:
    """Ids of the words' variants. A variant encoded as one token always contributes it. A variant split
    into several pieces contributes: 'all' every piece; 'first' its first visible piece (where the word
    starts); 'skip' nothing; 'auto' (default) nothing if another variant of the same word is a single
    token, else the first visible piece. Pieces like 'A' of 'A|lt|ernatively' are ordinary tokens, so
    'all'/'first' also hit other words (banning 'A' would ban the multiple-choice letter A)."""
    ids: set[int] = set()
    for word in words:
        encoded = [encode_plain(tokenizer, v) for v in word_variants(word)]
        single = {p[0] for p in encoded if len(p) == 1}
        ids |= single
        for pieces in encoded:
            if len(pieces) <= 1 or multi_token == "skip" or (multi_token == "auto" and single):
                continue
            if multi_token == "all":
                ids.update(pieces)
            else:
                first = _first_visible(tokenizer, pieces)
                if first is not None:
                    ids.add(first)
    return ids
