"""JSONL sample formats: SFT conversations, preference (MPO) pairs, RL prompts. One sample per line.

SFT (InternVL/LLaVA style):
    {"id": "s1", "image": "img/a.png" | ["a.png", "b.png"] (optional),
     "system": "..." (optional),
     "conversations": [{"from": "human", "value": "<image>\\nHow many ..."}, {"from": "gpt", "value": "..."}]}
Preference (MPO):
    {"id": "p1", "image": ..., "prompt": "<image>\\n...", "chosen": "...", "rejected": "...",
     "chosen_score": 1.0, "rejected_score": 0.0}          (scores optional)
RL prompt:
    {"id": "r1", "image": ..., "prompt": "<image>\\n...", "answer": "42", "type": "free-form" | "multiple-choice"}

Image paths are relative to the JSONL file. `<image>` marks where each image goes; a sample with images
and no `<image>` gets them in front of the first user turn (InternVL's behaviour).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
RL_TYPES = ("free-form", "multiple-choice")
_PLAIN_WORDS = re.compile(r"^[^\W\d_]+(?:[ '-][^\W\d_]+)*$")  # "north", "right angle": the reward compares text


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass
class Sample:
    """A parsed, validated sample of any format. Unused fields stay empty."""

    id: str
    where: str  # "file.jsonl:LINE", for error messages
    images: list[Path] = field(default_factory=list)
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)  # sft: the conversation; preference/rl: the user prompt
    chosen: str = ""
    rejected: str = ""
    chosen_score: float | None = None
    rejected_score: float | None = None
    answer: str = ""
    answer_type: str = "free-form"


class JsonlIndex:
    """Byte offsets of the non-empty lines of a JSONL file, so samples are read lazily (also in workers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("missing_file", f"data file {self.path} does not exist; check data.train_path")
        self.offsets: list[int] = []
        self.lines: list[int] = []  # 1-based line numbers, for file:line messages
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    self.offsets.append(offset)
                    self.lines.append(lineno)
                offset += len(raw)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def read(self, i: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            raw = f.readline()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError("bad_json", f"line is not valid JSON ({e}); fix or remove the line", self.where(i)) from None
        if not isinstance(obj, dict):
            raise DataError("bad_json", "line must be a JSON object", self.where(i))
        return obj


def _str_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError("bad_field", f"'{key}' must be a non-empty string, got {value!r}", where)
    return value


def _images(obj: dict, base: Path, where: str) -> list[Path]:
    raw = obj.get("image", obj.get("images"))
    if raw is None:
        return []
    paths = [raw] if isinstance(raw, str) else raw
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError("bad_field", f"'image' must be a path or a list of paths, got {raw!r}", where)
    return [base / p for p in paths]


def _check_placeholders(sample: Sample) -> None:
    """Number of <image> must equal the number of images; none at all means 'all in front'."""
    n = sum(t.text.count(IMAGE_PLACEHOLDER) for t in sample.turns if t.role == "user")
    in_answers = sum(t.text.count(IMAGE_PLACEHOLDER) for t in sample.turns if t.role == "assistant")
    in_answers += sample.chosen.count(IMAGE_PLACEHOLDER) + sample.rejected.count(IMAGE_PLACEHOLDER)
    if in_answers:
        raise DataError("placeholder_mismatch", "<image> appears in an assistant answer; images belong to user turns", sample.where)
    if n == 0 and sample.images:
        first = next(t for t in sample.turns if t.role == "user")
        first.text = (IMAGE_PLACEHOLDER + "\n") * len(sample.images) + first.text
    elif n != len(sample.images):
        raise DataError(
            "placeholder_mismatch",
            f"{n} <image> placeholders but {len(sample.images)} images; make them equal",
            sample.where,
        )


def _check_gold(answer: str, where: str) -> None:
    """A gold answer the reward cannot read would score every response 0. The rule reward compares a
    multiple-choice letter as a letter, then the text, then math-verify on `wrap_math(gold)`. Choice letters
    and plain words (compared as text) pass; anything else that math-verify, the reward's own parser, reads
    as no expression at all (e.g. `\\frac{1}{`, `x^`) is refused here."""
    import threading

    from engine.rl.answer_extraction import is_choice_gold
    from engine.rl.math_check import wrap_math

    if is_choice_gold(answer) or _PLAIN_WORDS.match(answer.strip()):
        return
    import logging

    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # math-verify bounds its time with signal.alarm, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        parsed = parse(wrap_math(answer), parsing_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any parser failure means the reward cannot use this gold
        parsed, why = [], f"{type(e).__name__}: {e}"
    else:
        why = "no expression"
    if not any(not isinstance(p, str) for p in parsed):
        raise DataError("unparsable_answer", f"the gold 'answer' {answer!r} does not parse as math ({why}), so every "
                        "response would score 0; fix it (a number, a LaTeX expression, or a choice letter)", where)


def _sample_id(obj: dict, where: str) -> str:
    sid = obj.get("id")
    if sid is None:
        return where  # file:line is a unique, stable id
    if not isinstance(sid, (str, int)):
        raise DataError("bad_field", f"'id' must be a string or integer, got {sid!r}", where)
    return str(sid)


def parse_sample(obj: dict, fmt: str, base: Path, where: str) -> Sample:
    """Validate one JSON object of format `fmt` ("sft" | "preference" | "rl")."""
    sample = Sample(id=_sample_id(obj, where), where=where, images=_images(obj, base, where))
    if fmt == "sft":
        convs = obj.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise DataError("bad_field", "'conversations' must be a non-empty list of {from, value} turns", where)
        for k, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ROLE_ALIASES or not isinstance(turn.get("value"), str):
                raise DataError(
                    "bad_field",
                    f"conversations[{k}] must be {{'from': human|gpt|system, 'value': str}}, got {turn!r}",
                    where,
                )
            role = ROLE_ALIASES[turn["from"]]
            if role == "system":
                if k != 0:
                    raise DataError("bad_turns", f"conversations[{k}]: a system turn may only come first", where)
                sample.system = turn["value"]
                continue
            sample.turns.append(Turn(role, turn["value"]))
        if "system" in obj:
            sample.system = _str_field(obj, "system", where, required=False)
        roles = [t.role for t in sample.turns]
        expected = ["user", "assistant"] * (len(roles) // 2)
        if len(roles) < 2 or roles != expected:
            raise DataError(
                "bad_turns", f"turns must alternate human, gpt, human, gpt ... and end with gpt; got {roles}", where
            )
        if any(not t.text.strip() for t in sample.turns if t.role == "assistant"):
            raise DataError("bad_turns", "an assistant (gpt) turn is empty; nothing to learn", where)
    elif fmt == "preference":
        sample.turns = [Turn("user", _str_field(obj, "prompt", where))]
        sample.chosen = _str_field(obj, "chosen", where)
        sample.rejected = _str_field(obj, "rejected", where)
        for key in ("chosen_score", "rejected_score"):
            value = obj.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DataError("bad_field", f"'{key}' must be a number, got {value!r}", where)
            setattr(sample, key, None if value is None else float(value))
    elif fmt == "rl":
        sample.turns = [Turn("user", _str_field(obj, "prompt", where))]
        answer = obj.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError("bad_field", f"'answer' (the gold answer) must be a non-empty string, got {answer!r}", where)
        sample.answer = answer
        _check_gold(answer, where)
        sample.answer_type = obj.get("type", "free-form")
        if sample.answer_type not in RL_TYPES:
            raise DataError("bad_field", f"'type' must be one of {list(RL_TYPES)}, got {sample.answer_type!r}", where)
    else:
        raise ValueError(f"unknown data format {fmt!r}; use sft, preference or rl")
    _check_placeholders(sample)
    return sample


class SampleSource:
    """A JSONL file of one format: `source[i]` -> validated Sample (raises DataError naming file:line)."""

    def __init__(self, path: str | Path, fmt: str, max_samples: int = 0):
        self.index = JsonlIndex(path)
        if max_samples and max_samples < len(self.index):  # the first N samples only (a small prompt pool)
            self.keep_only(range(max_samples))
        self.fmt = fmt
        self.base = self.index.path.parent

    def __len__(self) -> int:
        return len(self.index)

    def keep_only(self, indices) -> None:
        """Restrict the source to these samples (in this order); file:line messages stay right."""
        indices = list(indices)
        self.index.offsets = [self.index.offsets[i] for i in indices]
        self.index.lines = [self.index.lines[i] for i in indices]

    def pairs_with_reward_gap(self, min_gap: float) -> list[int]:
        """Preference pairs with chosen_score - rejected_score >= min_gap (R1V2's "MPO threshold"). A pair
        without both scores cannot be judged: DataError naming file:line."""
        keep = []
        for i in range(len(self)):
            sample = self[i]
            if sample.chosen_score is None or sample.rejected_score is None:
                raise DataError("bad_field", f"algorithm.mpo.pair_reward_gap={min_gap} needs 'chosen_score' and "
                                "'rejected_score' on every pair; add them, or set algorithm.mpo.pair_reward_gap=0 "
                                "to use every pair", self.index.where(i))
            if sample.chosen_score - sample.rejected_score >= min_gap:
                keep.append(i)
        return keep

    def __getitem__(self, i: int) -> Sample:
        where = self.index.where(i)
        return parse_sample(self.index.read(i), self.fmt, self.base, where)
