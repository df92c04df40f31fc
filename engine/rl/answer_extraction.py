"""Pull the final answer out of a model response: the `<think>` split, the last `\\boxed{...}`
(nested braces), an `Answer:` line, multiple-choice letters. Pure string functions."""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(response: str) -> tuple[str, str | None]:
    """(reasoning, answer part). No tags: ("", response). `<think>` opened but never closed
    (truncated generation): (reasoning, None) — there is no answer part."""
    if THINK_CLOSE in response:
        reasoning, answer = response.rsplit(THINK_CLOSE, 1)
        return reasoning.split(THINK_OPEN, 1)[-1], answer
    if THINK_OPEN in response:
        return response.split(THINK_OPEN, 1)[1], None
    return "", response


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{'; escaped braces (\\{, \\}) don't count."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal braces in LaTeX
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None  # unbalanced: malformed output


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed x`), else None."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b", text))):
        rest = m.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced(text, rest)
            if content is not None:
                return content.strip()
        elif rest > m.end():  # "\boxed 5": one token after a space
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*[:：]\s*(.+)", re.IGNORECASE)


def answer_line(text: str) -> str | None:
    """The text after the last `Answer:` on its line, without surrounding `$`, `**` or a final period."""
    hits = [m.group(1) for m in _ANSWER_LINE.finditer(text)]
    if not hits:
        return None
    ans = hits[-1].strip().strip("*").strip()
    ans = ans.rstrip(".").strip()  # "Answer: 3/4." -> "3/4"; a trailing period is never part of the value
    if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
        ans = ans.strip("$").strip()
    return ans or None


def extract_final_answer(response: str) -> str | None:
    """Final answer of a response: last \\boxed{} in the answer part, else its last `Answer:` line."""
    _, answer_part = split_think(response)
    if answer_part is None:
        return None
    boxed = last_boxed(answer_part)
    if boxed is not None:
        return boxed or None
    return answer_line(answer_part)


_CHOICE = re.compile(
    r"^\s*(?:(?:option|choice)\s+)?(?:\\text\{\s*)?[(\[]?\s*([A-E])\s*[)\]]?\s*\}?\s*(?:[.:)]|\s|$)",
    re.IGNORECASE,
)


def extract_choice(answer: str | None) -> str | None:
    """Multiple-choice letter A-E from 'B', '(B)', 'B.', 'B) 42', '\\text{B}', 'Option B'; else None."""
    if not answer:
        return None
    m = _CHOICE.match(answer)
    if not m:
        return None
    letter = m.group(1)
    # A lone lower-case letter is a variable ('a'), not a choice; accept lower case only when marked "(b)".
    if letter.islower() and not re.match(r"^\s*[(\[]", answer):
        return None
    return letter.upper()


def is_choice_gold(gold: str) -> bool:
    """Gold answers like 'B' or '(C)' are multiple-choice letters."""
    g = gold.strip()
    return len(g) <= 4 and extract_choice(g) is not None
