"""tools/distill_alcotd.py end to end on the tiny model with the native engine and greedy decoding:
penalties per row follow R1V eq. 1, the output is read by the SFT data loader, and a higher penalty
really reaches the engine (fewer repeated tokens for the same prompt)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, torchrun

RECIPE = "recipes/tiny_cpu_grpo.yaml"  # the tiny model + a rollout section


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alcotd_demo")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out), "--num", "3", "--seed", "3"],
                   cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def memorized(demo, tmp_path_factory) -> Path:
    """The tiny model trained with SFT on the 3 demo samples until it reproduces their traces (60 steps:
    loss ~0.015, measured ~10 s CPU), so greedy distillation gets correct answers to keep."""
    run = tmp_path_factory.mktemp("alcotd_sft")
    torchrun("tools/pretrain_vlm.py", ["--config", "recipes/tiny_cpu_sft.yaml", f"train.run_dir={run}",
                                       f"data.train_path={demo / 'sft.jsonl'}", "train.max_steps=60",
                                       "train.global_batch_size=2", "optim.warmup_ratio=0",
                                       "optim.decay_style=constant"], nproc=1, timeout=300)
    return run


def write_scored(demo: Path, path: Path, rows: list[tuple[int, str, dict]]) -> None:
    """rows: (demo row index, id, score fields) -> an RL-format file next to the demo images, with only the
    given scores (the demo set's own synthetic s_v / s_t / s_i are dropped)."""
    base = [{key: v for key, v in json.loads(line).items() if key not in ("s_v", "s_t", "s_i")}
            for line in (demo / "rl.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({**base[k], "id": sid, **scores}) + "\n" for k, sid, scores in rows))


def distill(data: Path, out: Path, *args: str) -> dict:
    proc = torchrun("tools/distill_alcotd.py", ["--config", RECIPE, "--data", str(data), "--out", str(out),
                                                "--temperature", "0", *args, "rollout.backend=native"],
                    nproc=1, timeout=300)
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("{")))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_distill_writes_sft_rows_the_loader_reads(demo, memorized, tmp_path):
    data = demo / "scored_a.jsonl"
    write_scored(demo, data, [
        (0, "hard", {"s_v": 9, "s_t": 9, "s_i": 9}),
        (1, "mid", {"s_v": 5, "s_t": 4, "s_i": 6}),
        (2, "midlow", {"s_v": 3, "s_t": 5, "s_i": 2}),
        (0, "easy", {"s_v": 0, "s_t": 0, "s_i": 0}),
        (1, "no_text_score", {"s_v": 1, "s_i": 2}),  # skipped and counted
    ])
    out = tmp_path / "out" / "sft.jsonl"
    summary = distill(data, out, "--ckpt", str(memorized), "--k", "1", "--max-tokens", "64", "--alpha", "1",
                      "--beta", "1", "--gamma", "1", "--on-error", "skip")
    assert summary["skipped"] == {"missing_score": 1} and summary["queries"] == 4
    assert sum(summary["traces"].values()) == 4
    assert summary["queries_kept"] + summary["queries_needing_revision"] == 4

    rows = read(out) + read(tmp_path / "out" / "sft.revise.jsonl")
    assert len(read(out)) == summary["rows_written"] and summary["rows_written"] >= 1
    # R1V eq. 1 by hand: each score column min-max scaled by /9 (min 0, max 9), β = γ = 1, α = 1
    expected = {"hard": 1.0, "mid": math.exp(12 / 27), "midlow": math.exp(17 / 27), "easy": 2.0}  # e^1 capped
    penalties = {r["id"]: r["alcotd"]["penalty"] for r in rows}
    assert penalties == pytest.approx(expected, rel=1e-6)
    for r in rows:
        assert r["alcotd"]["applied_penalty"] == pytest.approx(round(expected[r["id"]], 2))

    # the memorised model reproduces its training trace at P = 1, so that query is kept verbatim
    kept = {r["id"]: r for r in read(out)}
    sft_rows = {r["id"]: r for r in read(demo / "sft.jsonl")}
    assert kept["hard"]["conversations"][1]["value"].strip() == sft_rows["vr-000000"]["conversations"][1]["value"]
    for r in kept.values():
        assert r["alcotd"]["correct"] and r["alcotd"]["response_tokens"] > 0

    # the SFT data path reads every row (template incl. <think>, images) and batches them
    from engine.config import load_config
    from engine.data.loader import build_data_context, build_train_iterator

    cfg = load_config("recipes/tiny_cpu_sft.yaml", [f"data.train_path={out}", "data.num_workers=0"])
    ctx = build_data_context(cfg)
    planned = [ctx.planner.plan(i) for i in range(len(ctx.planner.source))]
    assert all(p.learn.sum() > 0 and p.tiles for p in planned)
    batch = next(build_train_iterator(cfg))
    assert batch["loss_mask"].sum() > 0 and batch["pixel_values"].shape[0] > 0
    assert json.loads((tmp_path / "out" / "sft.summary.json").read_text())["rows_written"] == len(planned)


@pytest.mark.slow
def test_higher_penalty_reaches_the_native_engine(demo, tmp_path):
    """Untrained tiny model, greedy: the same prompt twice, one easy (P = 2) and one hard (P = 1). The
    untrained model loops on a few tokens at P = 1; at P = 2 it repeats far less."""
    data = demo / "scored_b.jsonl"
    write_scored(demo, data, [(0, "hard", {"s_v": 1, "s_t": 1, "s_i": 1}),
                              (0, "easy", {"s_v": 0, "s_t": 0, "s_i": 0})])
    out = tmp_path / "sft.jsonl"
    summary = distill(data, out, "--k", "1", "--max-tokens", "48", "--alpha", "3")
    traces = {r["id"]: (r["alcotd"]["applied_penalty"], r["alcotd"]["traces"][0])
              for r in read(tmp_path / "sft.revise.jsonl")}
    (p_hard, hard), (p_easy, easy) = traces["hard"], traces["easy"]
    assert (p_hard, p_easy) == (1.0, 2.0)
    assert hard["text"] != easy["text"]
    assert easy["repeat_fraction"] < hard["repeat_fraction"] - 0.2, (easy, hard)
    buckets = summary["by_penalty_bucket"]
    assert buckets["[1.75,inf)"]["mean_repeat_fraction"] < buckets["[1.00,1.25)"]["mean_repeat_fraction"]


def test_missing_score_is_an_error_naming_file_and_line(demo, tmp_path, capsys):
    """Checked before the model is built (in-process: main() returns before torch.distributed starts)."""
    spec = importlib.util.spec_from_file_location("distill_alcotd", REPO / "tools" / "distill_alcotd.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = demo / "scored_c.jsonl"
    write_scored(demo, data, [(0, "a", {"s_v": 1, "s_t": 1, "s_i": 1}), (1, "b", {"s_v": 1, "s_i": 2})])
    assert tool.main(["--config", str(REPO / RECIPE), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{data}:2: sample b: 's_t' must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
