"""The generated visual-reasoning set: Pillow-drawn images with verifiable answers.

Five tasks, each at difficulty 1-3: counting shapes by colour, arithmetic on rendered numbers,
comparing sizes (multiple choice), reading a bar chart, the third angle of a triangle. Sample k of a
seed is drawn from random.Random(seed * 1_000_003 + k) alone, so the set is deterministic and any
prefix of it is the same whatever the total size. Each sample yields an SFT conversation (a `<think>`
trace and a `\\boxed{}` answer), a preference pair (correct vs a wrong trace/answer) and an RL prompt
(with synthetic AL-CoTD scores s_v / s_t / s_i).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TASKS = ("count", "arithmetic", "compare", "bar_chart", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "orange": (245, 150, 20),
           "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
INSTRUCTION = "Think step by step, then put the final answer in \\boxed{}."


@dataclass
class Item:
    image: Image.Image
    question: str
    answer: str
    wrong: str
    trace: str  # the correct reasoning
    wrong_trace: str
    kind: str = "free-form"  # or "multiple-choice"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    w, h = rng.choice([(320, 240), (448, 448), (512, 256), (240, 400), (640, 360)])  # several aspect ratios
    img = Image.new("RGB", (w, h), (250, 250, 245))
    return img, ImageDraw.Draw(img)


def _shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour) -> None:
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _wrong_int(rng: random.Random, value: int) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    return value + delta if value + delta >= 0 else value + abs(delta)


def count_task(rng: random.Random, level: int) -> Item:
    img, d = _canvas(rng)
    w, h = img.size
    colours = rng.sample(sorted(COLOURS), 1 + level)
    n = rng.randint(2 + 3 * level, 4 + 4 * level)
    cols = math.ceil(math.sqrt(n * w / h))
    rows = math.ceil(n / cols)
    cells = rng.sample(range(rows * cols), n)  # one shape per grid cell: no overlaps
    cw, ch = w / cols, h / rows
    shapes = []
    for c in cells:
        colour, kind = rng.choice(colours), rng.choice(SHAPES)
        r = 0.3 * min(cw, ch)
        _shape(d, kind, (c % cols + 0.5) * cw, (c // cols + 0.5) * ch, r, COLOURS[colour])
        shapes.append((colour, kind))
    target = rng.choice(colours)
    if level == 1:
        matches = [s for s in shapes if s[0] == target]
        question = f"How many {target} shapes are in the image?"
        what = f"{target} shapes"
    else:
        kind = rng.choice(SHAPES)
        matches = [s for s in shapes if s == (target, kind)]
        question = f"How many {target} {kind}s are in the image?"
        what = f"{target} {kind}s"
    k = len(matches)
    trace = f"There are {n} shapes in total. I go through them and count the {what}: there are {k}."
    wrong = _wrong_int(rng, k)
    wrong_trace = f"There are {n} shapes in total. Counting the {what} quickly, I get {wrong}."
    return Item(img, question, str(k), str(wrong), trace, wrong_trace)


def arithmetic_task(rng: random.Random, level: int) -> Item:
    img, d = _canvas(rng)
    if level == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        expr, value, steps = f"{a} + {b}", a + b, f"{a} + {b} = {a + b}."
    elif level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        expr, steps = f"{a} {op} {b}", f"{a} {op} {b} = {value}."
    else:
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 50)
        expr, value = f"{a} x {b} + {c}", a * b + c
        steps = f"First {a} x {b} = {a * b}, then {a * b} + {c} = {value}."
    w, h = img.size
    font = _font(max(18, min(w, h) // 6))
    box = d.textbbox((0, 0), expr, font=font)
    d.text(((w - (box[2] - box[0])) / 2, (h - (box[3] - box[1])) / 2), expr, fill=(20, 20, 20), font=font)
    wrong = _wrong_int(rng, abs(value)) * (1 if value >= 0 else -1)
    return Item(img, "What is the value of the expression written in the image?", str(value), str(wrong),
                f"The image shows {expr}. {steps}", f"The image shows {expr}. Roughly, that gives {wrong}.")


def compare_task(rng: random.Random, level: int) -> Item:
    img, d = _canvas(rng)
    w, h = img.size
    k = 1 + level  # 2, 3 or 4 shapes
    letters = "ABCD"[:k]
    base = 0.18 * min(w / k, h)
    gap = {1: 0.5, 2: 0.3, 3: 0.15}[level]  # smaller size differences at higher levels
    radii = [base * (1 + gap * i) for i in range(k)]
    rng.shuffle(radii)
    font = _font(max(14, int(min(w, h) / 14)))
    kind = rng.choice(SHAPES)
    for i, (letter, r) in enumerate(zip(letters, radii)):
        cx, cy = (i + 0.5) * w / k, h * 0.45
        _shape(d, kind, cx, cy, r, COLOURS[rng.choice(sorted(COLOURS))])
        d.text((cx - 5, h * 0.85), letter, fill=(0, 0, 0), font=font)
    ask_largest = rng.random() < 0.5
    pick = max if ask_largest else min
    best = letters[radii.index(pick(radii))]
    wrong = rng.choice([c for c in letters if c != best])
    word = "largest" if ask_largest else "smallest"
    q = f"Which {kind} is the {word}? Options: " + ", ".join(letters) + "."
    trace = f"I compare the sizes of the {k} {kind}s labelled {', '.join(letters)}. {best} is the {word}."
    return Item(img, q, best, wrong, trace, f"Looking briefly, {wrong} seems the {word}.", "multiple-choice")


def bar_chart_task(rng: random.Random, level: int) -> Item:
    img, d = _canvas(rng)
    w, h = img.size
    cats = rng.sample(["A", "B", "C", "D", "E", "F"], 2 + level)
    values = [rng.randint(1, 10) for _ in cats]
    font = _font(max(12, int(min(w, h) / 16)))
    left, bottom, top = 0.12 * w, 0.85 * h, 0.1 * h
    unit = (bottom - top) / 10  # y axis goes 0..10
    for v in range(0, 11, 2):
        y = bottom - v * unit
        d.line([(left, y), (w * 0.97, y)], fill=(200, 200, 200))
        d.text((left * 0.3, y - 6), str(v), fill=(0, 0, 0), font=font)
    bw = (w * 0.85) / len(cats)
    for i, (c, v) in enumerate(zip(cats, values)):
        x0 = left + i * bw + 0.15 * bw
        d.rectangle([x0, bottom - v * unit, x0 + 0.7 * bw, bottom], fill=COLOURS["blue"])
        d.text((x0 + 0.25 * bw, bottom + 4), c, fill=(0, 0, 0), font=font)
        d.text((x0 + 0.25 * bw, bottom - v * unit - getattr(font, "size", 11) - 4), str(v), fill=(0, 0, 0), font=font)  # above the bar
    read = ", ".join(f"{c} = {v}" for c, v in zip(cats, values))
    if level == 1:
        c = rng.choice(cats)
        v = values[cats.index(c)]
        wrong = _wrong_int(rng, v)
        return Item(img, f"What is the value of bar {c} in the chart?", str(v), str(wrong),
                    f"Reading the chart: {read}. Bar {c} is {v}.", f"Bar {c} looks like {wrong}.")
    if level == 2:
        best = cats[values.index(max(values))]
        wrong = rng.choice([c for c in cats if c != best])
        q = "Which bar in the chart is the tallest? Options: " + ", ".join(cats) + "."
        return Item(img, q, best, wrong, f"Reading the chart: {read}. The largest value is {max(values)}, bar {best}.",
                    f"Bar {wrong} looks tallest.", "multiple-choice")
    diff = max(values) - min(values)
    wrong = _wrong_int(rng, diff)
    return Item(img, "What is the difference between the tallest and the shortest bar?", str(diff), str(wrong),
                f"Reading the chart: {read}. The tallest is {max(values)}, the shortest {min(values)}, "
                f"so the difference is {max(values)} - {min(values)} = {diff}.",
                f"The tallest minus the shortest is about {wrong}.")


def triangle_task(rng: random.Random, level: int) -> Item:
    img, d = _canvas(rng)
    w, h = img.size
    step = {1: 10, 2: 5, 3: 1}[level]
    while True:
        a = rng.randrange(30, 100, step)
        b = rng.randrange(30, 100, step)
        if a + b <= 150:  # third angle >= 30 degrees keeps the drawing readable
            break
    c = 180 - a - b
    # Vertices A (left), B (right) on a base; C from the angles at A and B.
    base = 0.6 * w
    ax, ay = 0.2 * w, 0.8 * h
    ta, tb = math.radians(a), math.radians(b)
    x = base * math.tan(tb) / (math.tan(ta) + math.tan(tb))
    height = x * math.tan(ta)
    scale = min(1.0, 0.65 * h / height)
    pts = [(ax, ay), (ax + base * scale, ay), (ax + x * scale, ay - height * scale)]
    d.polygon(pts, outline=(20, 20, 20), width=3)
    font = _font(max(12, int(min(w, h) / 14)))
    d.text((pts[0][0] + 10, pts[0][1] - 24), f"{a}°", fill=COLOURS["red"], font=font)
    d.text((pts[1][0] - 45, pts[1][1] - 24), f"{b}°", fill=COLOURS["red"], font=font)
    d.text((pts[2][0] - 5, pts[2][1] - 22), "?", fill=COLOURS["blue"], font=font)
    wrong = 180 - a - b + rng.choice([-10, 10, 5, -5])
    return Item(img, "Two angles of the triangle are marked. What is the angle marked '?' in degrees?", str(c),
                str(wrong), f"The angles of a triangle add up to 180 degrees. 180 - {a} - {b} = {c}.",
                f"The angles add up to 180, so it is about {wrong}.")


MAKERS = {"count": count_task, "arithmetic": arithmetic_task, "compare": compare_task, "bar_chart": bar_chart_task,
          "triangle": triangle_task}


def make_item(seed: int, k: int) -> tuple[str, int, Item]:
    rng = random.Random(seed * 1_000_003 + k)
    task = TASKS[k % len(TASKS)]
    level = 1 + (k // len(TASKS)) % 3
    return task, level, MAKERS[task](rng, level)


# How much of each task's answer has to be read off the image (synthetic S_v base, see alcotd_scores)
VISUAL_LOAD = {"count": 0.6, "arithmetic": 0.2, "compare": 0.5, "bar_chart": 0.7, "triangle": 0.4}


def alcotd_scores(task: str, level: int, item: Item, seed: int, k: int) -> dict[str, float]:
    """Synthetic R1V AL-CoTD scores in [0, 1] (R1V gets them from QDAM / VTIA models): S_v from the task's
    visual load and the level, S_t from the question's length, S_I from the level; deterministic noise."""
    noise = random.Random(seed * 104_729 + k)
    s_v = VISUAL_LOAD[task] + 0.1 * (level - 1) + noise.uniform(0.0, 0.1)
    s_t = len(item.question.split()) / 40 + noise.uniform(0.0, 0.1)
    s_i = level / 3 - noise.uniform(0.0, 0.15)
    return {key: round(min(1.0, max(0.0, v)), 3) for key, v in (("s_v", s_v), ("s_t", s_t), ("s_i", s_i))}


def _response(trace: str, answer: str) -> str:
    return f"<think>\n{trace}\n</think>\n\nThe answer is \\boxed{{{answer}}}."


def write_demo_set(out_dir: str | Path, num_samples: int, seed: int = 0) -> dict[str, Path]:
    """Images + sft.jsonl, preference.jsonl, rl.jsonl under out_dir. Returns the file paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("sft", "preference", "rl")}
    handles = {name: open(path, "w") for name, path in files.items()}
    try:
        for k in range(num_samples):
            task, level, item = make_item(seed, k)
            rel = f"images/{k:06d}_{task}.png"
            item.image.save(out / rel)
            prompt = f"<image>\n{item.question} {INSTRUCTION}"
            meta = {"task": task, "level": level}
            # A synthetic reward-model score (0-5) in place of R1V's RM, for iterative SFT's D_rm(tau):
            # easier levels score higher, with deterministic noise.
            rm_score = max(0, min(5, 6 - 2 * level + random.Random(seed * 7919 + k).randint(0, 2)))
            handles["sft"].write(json.dumps({"id": f"vr-{k:06d}", "image": rel, **meta, "rm_score": rm_score, "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": _response(item.trace, item.answer)}]}) + "\n")
            handles["preference"].write(json.dumps({"id": f"vr-{k:06d}", "image": rel, **meta, "prompt": prompt,
                                                    "chosen": _response(item.trace, item.answer),
                                                    "rejected": _response(item.wrong_trace, item.wrong),
                                                    "chosen_score": 1.0, "rejected_score": 0.0}) + "\n")
            handles["rl"].write(json.dumps({"id": f"vr-{k:06d}", "image": rel, **meta, "prompt": prompt,
                                            "answer": item.answer, "type": item.kind,
                                            **alcotd_scores(task, level, item, seed, k)}) + "\n")
    finally:
        for f in handles.values():
            f.close()
    return files


def demo_texts(num_samples: int, seed: int = 0) -> list[str]:
    """Every text of the set (prompts, traces, answers), to train the tiny tokenizer on."""
    texts = []
    for k in range(num_samples):
        _, _, item = make_item(seed, k)
        texts += [f"{item.question} {INSTRUCTION}", _response(item.trace, item.answer),
                  _response(item.wrong_trace, item.wrong)]
    return texts
