"""R1V iterative SFT end to end: each iteration trains on exactly D_rm(tau_t) ∪ E_{t-1}."""

from __future__ import annotations

import json

import pytest

from tests.engine.train.test_resume import finish
from tests.engine.train.test_stages import run_recipe

pytestmark = pytest.mark.slow


def ids_of(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_iterations_select_rm_threshold_union_previous_mistakes(demo_data, tmp_path):
    source = demo_data / "sft.jsonl"
    finish(run_recipe("tiny_cpu_iterative_sft", tmp_path, [f"data.train_path={source}"]), timeout=400)
    scores = {r["id"]: r["rm_score"] for r in map(json.loads, source.read_text().splitlines())}
    log = [json.loads(line) for line in (tmp_path / "iterations.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in log] == [1, 2]

    # t=1: no M_0 given, so E_0 is empty and the selection is D_rm(2) alone
    it1 = set(ids_of(tmp_path / "iter_1" / "train.jsonl"))
    assert it1 == {sid for sid, s in scores.items() if s >= 2.0}
    # t=2: D_rm(3) ∪ E_1, E_1 = what M_1 answered wrong (found by greedy generation + the rule check)
    wrong_1 = set(json.loads((tmp_path / "iter_1" / "wrong_after.json").read_text()))
    it2 = ids_of(tmp_path / "iter_2" / "train.jsonl")
    assert len(it2) == len(set(it2)) and set(it2) == {sid for sid, s in scores.items() if s >= 3.0} | wrong_1
    assert log[1]["selected"] == len(it2) and log[1]["e_prev"] == len(wrong_1)
    # each iteration trained and checkpointed; M_2 started from M_1
    for t in (1, 2):
        assert (tmp_path / f"iter_{t}" / "checkpoints" / "latest").exists()
        assert (tmp_path / f"iter_{t}" / "metrics.jsonl").read_text().strip()


def test_missing_scores_name_the_file_and_line(demo_data, tmp_path):
    bad = tmp_path / "unscored.jsonl"
    lines = (demo_data / "sft.jsonl").read_text().splitlines()[:5]
    row = json.loads(lines[2])
    del row["rm_score"]
    lines[2] = json.dumps(row)
    bad.write_text("\n".join(lines) + "\n")
    proc = run_recipe("tiny_cpu_iterative_sft", tmp_path / "run", [f"data.train_path={bad}"])
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode != 0 and f"{bad}:3: sample 'vr-000002' has no numeric 'rm_score'" in out
