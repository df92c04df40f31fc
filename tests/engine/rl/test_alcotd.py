"""AL-CoTD pure parts (engine/rl/alcotd.py) against hand computations."""

import json
import math

import pytest
import torch

from engine.data.errors import DataError
from engine.data.formats import parse_sample
from engine.rl.alcotd import (
    AlcotdParams, Query, Trace, bucket_label, group_by_penalty, kept_traces, parse_scores, quantize_penalty,
    query_penalties, repeat_fraction, revision_record, sft_record, summarize, trace_status,
)

FIELDS = ("s_v", "s_t", "s_i")


def test_parse_scores_and_errors_name_the_line():
    assert parse_scores({"s_v": 1, "s_t": 2.5, "s_i": 0}, FIELDS, "f.jsonl:3") == (1.0, 2.5, 0.0)
    for bad in ({"s_v": 1, "s_i": 0}, {"s_v": 1, "s_t": "2", "s_i": 0}, {"s_v": True, "s_t": 1, "s_i": 0},
                {"s_v": float("nan"), "s_t": 1, "s_i": 0}):
        with pytest.raises(DataError) as e:
            parse_scores({"id": "q7", **bad}, FIELDS, "f.jsonl:3")
        assert e.value.reason == "missing_score" and str(e.value).startswith("f.jsonl:3: sample q7")
    assert parse_scores({"vis": 1, "txt": 2, "int": 3}, ("vis", "txt", "int"), "x:1") == (1.0, 2.0, 3.0)


def test_query_penalties_by_hand():
    # columns: v = [9, 5, 3, 0] -> /9; t = [9, 4, 5, 0] -> /9; i = [9, 6, 2, 0] -> /9 (min 0, max 9 each)
    s = torch.tensor([[9, 9, 9], [5, 4, 6], [3, 5, 2], [0, 0, 0]], dtype=torch.float64)
    p = query_penalties(s, AlcotdParams(alpha=1.0, beta=1.0, gamma=1.0))
    # (v + t + i) / 3 = [1, 15/27, 10/27, 0] -> exp(1 - c) = [1, e^(12/27), e^(17/27), e = 2.72 -> capped 2]
    assert p.tolist() == pytest.approx([1.0, math.exp(12 / 27), math.exp(17 / 27), 2.0], rel=1e-6)
    # β = 2, γ = 0: (v + 2t) / 3 = [1, 13/27, 13/27, 0]; α = 0.5, cap 1.5 (e^0.5 = 1.65 is capped)
    p = query_penalties(s, AlcotdParams(alpha=0.5, beta=2.0, gamma=0.0, max_penalty=1.5))
    assert p.tolist() == pytest.approx([1.0, math.exp(0.5 * 14 / 27), math.exp(0.5 * 14 / 27), 1.5], rel=1e-6)
    # unscaled scores are used as given ...
    p = query_penalties(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.8, 0.5]]), AlcotdParams(alpha=0.5, scale=False))
    assert p.tolist() == pytest.approx([math.exp(0.25), math.exp(0.25)], rel=1e-6)
    # ... and must lie in [0, 1]
    with pytest.raises(DataError, match="outside \\[0, 1\\]") as e:
        query_penalties(torch.tensor([[0.5, 0.5, 0.5], [0.2, 3.0, 0.1]]), AlcotdParams(alpha=1.0, scale=False),
                        ["a.jsonl:1", "a.jsonl:2"])
    assert e.value.where == "a.jsonl:2"
    with pytest.raises(ValueError, match="α, β, γ >= 0"):
        AlcotdParams(alpha=-1.0)


def test_quantize_and_group_by_penalty():
    assert quantize_penalty(1.5596, 0.01) == 1.56
    assert quantize_penalty(1.149999, 0.05) == 1.15
    assert quantize_penalty(1.004, 0.01) == 1.0 and quantize_penalty(1.004, 0.0) == 1.004
    groups = group_by_penalty([2.0, 1.001, 1.556, 1.999, 1.5596], 0.01)
    assert groups == {1.0: [1], 1.56: [2, 4], 2.0: [0, 3]}
    assert list(groups) == sorted(groups)
    assert group_by_penalty([1.2, 1.2000001], 0.0) == {1.2: [0], 1.2000001: [1]}


def test_repeat_fraction_and_trace_status():
    assert repeat_fraction([]) == 0.0
    assert repeat_fraction([5, 6, 7]) == 0.0
    assert repeat_fraction([5, 5, 5, 6]) == pytest.approx(0.5)  # 2 distinct of 4
    assert trace_status("x</think>\n\nThe answer is \\boxed{3}.", "stop", True) == "correct"
    assert trace_status("x</think>\n\nThe answer is \\boxed{4}.", "stop", False) == "wrong"
    assert trace_status("x</think> \\boxed{3}", "length", True) == "unfinished"  # cut off
    assert trace_status("reasoning \\boxed{3}", "stop", True) == "unfinished"  # never closed </think>
    assert trace_status("x<|im_start|>user</think>\\boxed{3}", "stop", True) == "malformed"


def _query(traces, row=None, penalty=1.5):
    row = row or {"id": "q1", "image": "images/a.png", "prompt": "<image>\nHow many?", "answer": "3",
                  "type": "free-form", "s_v": 1, "s_t": 2, "s_i": 3, "rm_score": 4}
    return Query(0, "src/rl.jsonl:1", row, (1.0, 2.0, 3.0), penalty, round(penalty, 2), traces)


def test_kept_traces_first_distinct_correct():
    good = "r</think>\\boxed{3}"
    traces = [Trace(0, "w</think>\\boxed{4}", 5, 0.0, "wrong"), Trace(1, good, 4, 0.0, "correct"),
              Trace(2, good, 4, 0.0, "correct"), Trace(3, "other" + good, 6, 0.0, "correct")]
    q = _query(traces)
    assert [t.sample for t in kept_traces(q, 1)] == [1]
    assert [t.sample for t in kept_traces(q, 5)] == [1, 3]  # the duplicate text of sample 2 is dropped


def test_sft_record_is_a_valid_sft_sample(tmp_path):
    trace = Trace(2, "There are 3.\n</think>\n\nThe answer is \\boxed{3}.", 17, 0.25, "correct")
    q = _query([trace])
    src, out = tmp_path / "src", tmp_path / "out" / "deep"
    rec = sft_record(q, trace, src, out, FIELDS, multiple=False, scaled=(0.0, 0.5, 1.0))
    assert rec["id"] == "q1" and rec["rm_score"] == 4 and "prompt" not in rec and "answer" not in rec
    assert (out / rec["image"]).resolve() == (src / "images/a.png").resolve()  # relative to the output file
    assert rec["conversations"][1]["value"].startswith("<think>\n")
    meta = rec["alcotd"]
    assert meta["penalty"] == 1.5 and meta["applied_penalty"] == 1.5 and meta["gold"] == "3"
    assert meta["scores"] == {"s_v": 1.0, "s_t": 2.0, "s_i": 3.0}
    assert meta["scaled_scores"] == {"s_v": 0.0, "s_t": 0.5, "s_i": 1.0}
    assert meta["response_tokens"] == 17 and meta["correct"] is True and meta["sample"] == 2
    # the SFT parser accepts it (the JSON round trip included)
    sample = parse_sample(json.loads(json.dumps(rec)), "sft", out, "out.jsonl:1")
    assert [t.role for t in sample.turns] == ["user", "assistant"] and len(sample.images) == 1
    assert sft_record(q, trace, src, out, FIELDS, multiple=True)["id"] == "q1#2"


def test_revision_record_keeps_the_rl_prompt(tmp_path):
    q = _query([Trace(0, "no close", 64, 0.5, "unfinished")])
    rec = revision_record(q, tmp_path, tmp_path, FIELDS)
    sample = parse_sample(json.loads(json.dumps(rec)), "rl", tmp_path, "r.jsonl:1")
    assert sample.answer == "3"
    assert rec["alcotd"]["needs_revision"] and rec["alcotd"]["traces"][0]["status"] == "unfinished"
    assert rec["alcotd"]["traces"][0]["text"] == "<think>\nno close"


def test_bucket_label():
    edges = (1.0, 1.25, 1.5, 1.75)
    assert bucket_label(1.0, edges) == "[1.00,1.25)"
    assert bucket_label(1.2499, edges) == "[1.00,1.25)"
    assert bucket_label(1.25, edges) == "[1.25,1.50)"
    assert bucket_label(2.0, edges) == "[1.75,inf)"


def test_summarize_by_hand():
    a = _query([Trace(0, "a", 10, 0.1, "correct"), Trace(1, "b", 20, 0.3, "wrong")], penalty=1.1)
    b = _query([Trace(0, "c", 30, 0.0, "unfinished"), Trace(1, "d", 50, 0.2, "malformed")], penalty=1.9)
    c = _query([Trace(0, "e", 4, 0.0, "correct"), Trace(1, "f", 6, 0.0, "correct")], penalty=2.0)
    s = summarize([a, b, c], per_query=1)
    assert s["queries"] == 3 and s["queries_kept"] == 2 and s["queries_needing_revision"] == 1
    assert s["rows_written"] == 2
    assert s["traces"] == {"correct": 3, "wrong": 1, "unfinished": 1, "malformed": 1}
    assert s["penalty"] == pytest.approx({"min": 1.1, "max": 2.0, "mean": 5.0 / 3})
    low, high = s["by_penalty_bucket"]["[1.00,1.25)"], s["by_penalty_bucket"]["[1.75,inf)"]
    assert low == pytest.approx({"queries": 1, "traces": 2, "kept_rows": 1, "mean_length": 15.0, "accuracy": 0.5,
                                 "mean_repeat_fraction": 0.2})
    assert high == pytest.approx({"queries": 2, "traces": 4, "kept_rows": 1, "mean_length": 22.5, "accuracy": 0.5,
                                  "mean_repeat_fraction": 0.05})
    assert list(s["by_penalty_bucket"]) == ["[1.00,1.25)", "[1.75,inf)"]
    assert summarize([a, b, c], per_query=2)["rows_written"] == 3
