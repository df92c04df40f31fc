"""Format validation names file:line; on_error=raise stops, on_error=skip counts skips by reason."""

from __future__ import annotations

import pytest

from engine.data.errors import DataError
from engine.data.formats import SampleSource
from engine.data.loader import build_train_iterator

from data_testutils import tiny_config, write_jsonl

GOOD = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<think>\nx\n</think>\n\ny"}]}

BAD_SFT = [
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ({"id": "a"}, "bad_field"),
    ({"id": "b", "conversations": [{"from": "robot", "value": "x"}]}, "bad_field"),
    ({"id": "c", "conversations": [{"from": "human", "value": "x"}]}, "bad_turns"),
    ({"id": "d", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "bad_turns"),
    ({"id": "e", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}, "bad_turns"),
    ({"id": "f", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> x"},
                                                                {"from": "gpt", "value": "y"}]}, "placeholder_mismatch"),
    ({"id": "g", "image": 5, "conversations": GOOD["conversations"]}, "bad_field"),
    ({"id": "h", "image": "nope.png", "conversations": GOOD["conversations"]}, "missing_image"),
]


@pytest.mark.parametrize("row,reason", BAD_SFT)
def test_sft_validation_names_file_and_line(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", row])  # the blank line is skipped, the bad one is line 3
    cfg = tiny_config(train_path=str(path), shuffle=False)
    it = build_train_iterator(cfg)
    with pytest.raises(DataError) as e:
        next(it)
    assert e.value.reason == reason
    assert f"{path}:3" in str(e.value)


@pytest.mark.parametrize(
    "fmt,row,reason",
    [
        ("rl", {"prompt": "q"}, "bad_field"),
        ("rl", {"prompt": "q", "answer": "1", "type": "essay"}, "bad_field"),
        ("preference", {"prompt": "q", "chosen": "a"}, "bad_field"),
        ("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": "high"}, "bad_field"),
        ("preference", {"prompt": "q", "chosen": "<image>", "rejected": "b"}, "placeholder_mismatch"),
    ],
)
def test_other_formats_validation(tmp_path, fmt, row, reason):
    src = SampleSource(write_jsonl(tmp_path / "d.jsonl", [row]), fmt)
    with pytest.raises(DataError) as e:
        src[0]
    assert e.value.reason == reason and "d.jsonl:1" in str(e.value)


def test_images_without_placeholder_go_first(tmp_path):
    src = SampleSource(write_jsonl(tmp_path / "d.jsonl", [{"image": ["a.png", "b.png"], "prompt": "q", "answer": "1"}]), "rl")
    s = src[0]
    assert s.turns[0].text == "<image>\n<image>\nq" and s.images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert s.id == f"{tmp_path / 'd.jsonl'}:1"  # no id: file:line is the id


def test_skip_policy_counts_by_reason(tmp_path, demo_dir):
    import json

    good = [json.loads(line) for line in (demo_dir / "sft.jsonl").read_text().splitlines()[:6]]
    for g in good:
        g["image"] = str(demo_dir / g["image"])
    (tmp_path / "empty.png").write_bytes(b"")
    bad = ["{oops", {"id": "x", "conversations": []},
           {"id": "y", "image": str(tmp_path / "empty.png"), "conversations": GOOD["conversations"]},
           {"id": "z", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "no trace"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", good[:3] + bad + good[3:])
    cfg = tiny_config(train_path=str(path), on_error="skip", shuffle=False, pack_window=100)
    it = build_train_iterator(cfg)
    seen = set()
    while len(seen) < 6:
        batch = next(it)
        seen.update(i for row in batch["sample_ids"] for i in row)
    assert seen == {g["id"] for g in good}
    assert it.skips.summary() == {"bad_field": 1, "bad_json": 1, "empty_image": 1, "missing_think": 1}


def test_all_samples_bad_is_an_error_not_a_hang(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{x", "{y", {"id": "z"}])
    it = build_train_iterator(tiny_config(train_path=str(path), on_error="skip"))
    with pytest.raises(DataError, match=f"every sample of this rank's shard of {path}") as e:
        next(it)
    assert e.value.reason == "no_valid_samples" and it.plans.planned_skips.total == 3


def test_max_samples_cuts_the_training_file_only(tmp_path):
    from engine.config.base import ConfigError
    from engine.data.loader import build_data_context

    rows = [{"id": f"p{i}", "prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    train, valid = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "valid.jsonl", rows)
    src = SampleSource(train, "rl", max_samples=3)
    assert len(src) == 3 and [src[i].id for i in range(3)] == ["p0", "p1", "p2"]
    assert len(SampleSource(train, "rl", max_samples=9)) == 5 and len(SampleSource(train, "rl")) == 5
    cfg = tiny_config(train_path=str(train), valid_path=str(valid), format="rl", packing=False, max_samples=2)
    assert len(build_data_context(cfg).planner.source) == 2
    assert len(build_data_context(cfg, path=valid).planner.source) == 5
    with pytest.raises(ConfigError, match="max_samples=-1"):
        tiny_config(train_path=str(train), max_samples=-1)


def test_pair_reward_gap_keeps_pairs_at_or_above_it_and_counts_the_rest(tmp_path):
    from engine.data.loader import build_train_iterator

    pairs = [{"id": f"p{i}", "prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": c, "rejected_score": r}
             for i, (c, r) in enumerate([(20, 4), (10, 4), (15, 0), (3, 9), (30, 15)])]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = tiny_config(train_path=str(path), format="preference", packing=False, shuffle=False)
    mcfg = tiny_config("algorithm.mpo.pair_reward_gap=15", train_path=str(path), format="preference", packing=False,
                       shuffle=False)
    it = build_train_iterator(mcfg)
    assert [it.ctx.planner.source[i].id for i in range(len(it.ctx.planner.source))] == ["p0", "p2", "p4"]
    assert it.ctx.filtered["below_pair_reward_gap"] == 2  # a whole-file count: the trainer adds it once
    assert len(build_train_iterator(cfg).ctx.planner.source) == 5  # gap 0 (default): every pair

    write_jsonl(path, pairs[:2] + [{"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="pairs.jsonl:3") as e:
        build_train_iterator(mcfg)
    assert "chosen_score" in str(e.value)


@pytest.mark.parametrize("gold", [r"\frac{1}{", "x^", r"\sqrt{2", r"\boxed{}", "{"])
def test_a_gold_answer_the_reward_cannot_parse_is_refused_with_file_and_line(tmp_path, gold):
    rows = [{"id": "ok", "prompt": "q", "answer": r"\frac{1}{2}"}, {"id": "bad", "prompt": "q", "answer": gold}]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    src = SampleSource(path, "rl")
    assert src[0].answer == r"\frac{1}{2}"
    with pytest.raises(DataError, match=rf"rl.jsonl:2: the gold 'answer' .* does not parse as math") as e:
        src[1]
    assert e.value.reason == "unparsable_answer"


@pytest.mark.parametrize("gold", ["42", "B", "(C)", r"\frac{32}{3}\pi", "3/4", "north", "right angle", r"60^\circ",
                                  r"\text{red}", "1,000"])
def test_gold_answers_the_reward_can_read_are_accepted(tmp_path, gold):
    src = SampleSource(write_jsonl(tmp_path / "rl.jsonl", [{"id": "g", "prompt": "q", "answer": gold}]), "rl")
    assert src[0].answer == gold


def test_the_rule_reward_indeed_scores_everything_zero_against_such_a_gold():
    """Why the loader refuses it: math-verify matches no response to it, the right one included."""
    from engine.rl.math_check import verify_equivalent

    assert not verify_equivalent(r"\frac{1}{2}", r"\frac{1}{")
    assert verify_equivalent(r"\frac{1}{2}", "0.5")
