"""tools/make_demo_data.py, tools/inspect_data.py (its JSON contract) and tools/bench_data.py, run as CLIs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    res = run_tool("tools/make_demo_data.py", "--out", str(out), "--num", "12", "--seed", "3")
    assert res.returncode == 0, res.stderr
    return out


def test_demo_set_is_deterministic_and_complete(demo, tmp_path):
    again = tmp_path / "again"
    assert run_tool("tools/make_demo_data.py", "--out", str(again), "--num", "12", "--seed", "3").returncode == 0
    assert tree_digest(demo) == tree_digest(again)
    other = tmp_path / "other"
    assert run_tool("tools/make_demo_data.py", "--out", str(other), "--num", "12", "--seed", "4").returncode == 0
    assert tree_digest(demo) != tree_digest(other)
    sft = [json.loads(x) for x in (demo / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 12 and {s["task"] for s in sft} == {"count", "arithmetic", "compare", "bar_chart", "triangle"}
    assert {s["level"] for s in sft} == {1, 2, 3}
    assert all("<think>" in s["conversations"][1]["value"] and "\\boxed{" in s["conversations"][1]["value"] for s in sft)
    pref = [json.loads(x) for x in (demo / "preference.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pref)
    rl = [json.loads(x) for x in (demo / "rl.jsonl").read_text().splitlines()]
    assert all(f"\\boxed{{{r['answer']}}}" in s["conversations"][1]["value"] for r, s in zip(rl, sft))
    assert all(0.0 <= r[key] <= 1.0 for r in rl for key in ("s_v", "s_t", "s_i"))  # synthetic AL-CoTD scores
    by_level = {lvl: [r["s_i"] for r in rl if r["level"] == lvl] for lvl in (1, 2, 3)}
    assert max(by_level[1]) < min(by_level[3])  # integration score follows the difficulty


KEYS = {"id", "status", "error", "tiles", "image_tokens", "tokens", "truncated"}


def inspect_json(*args: str) -> tuple[list[dict], dict]:
    res = run_tool("tools/inspect_data.py", "--json", *args)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert "summary" in lines[-1] and all("summary" not in x for x in lines[:-1])
    return lines[:-1], lines[-1]["summary"]


def test_inspect_generated_set(demo):
    recs, summary = inspect_json("--data", str(demo / "sft.jsonl"), "--max-tiles", "4")
    assert len(recs) == 12 and all(set(r) == KEYS for r in recs)
    assert all(r["status"] == "ok" and r["error"] is None for r in recs)
    for r in recs:
        assert len(r["tiles"]) == 1 and 1 <= r["tiles"][0] <= 5  # max 4 tiles + thumbnail
        assert r["image_tokens"] == sum(r["tiles"]) * 256 and r["tokens"] > r["image_tokens"]
    assert summary["ok"] == 12 and summary["error"] == 0 and summary["tokens"] == sum(r["tokens"] for r in recs)


def test_inspect_broken_file(demo, tmp_path):
    good = (demo / "sft.jsonl").read_text().splitlines()[0]
    (tmp_path / "empty.png").write_bytes(b"")
    trunc = (demo / "images").glob("*.png").__next__().read_bytes()
    (tmp_path / "cut.png").write_bytes(trunc[: len(trunc) // 2])
    conv = [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "<think>\na\n</think>\n\nb"}]
    rows = [
        good.replace('"images/', f'"{demo}/images/'),
        "{broken",
        json.dumps({"id": "no-image", "image": "missing.png", "conversations": conv}),
        json.dumps({"id": "empty", "image": str(tmp_path / "empty.png"), "conversations": conv}),
        json.dumps({"id": "cut", "image": str(tmp_path / "cut.png"), "conversations": conv}),
        json.dumps({"id": "long", "conversations": [{"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "<think>\n" + "a " * 5000 + "</think> b"}]}),
    ]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(rows) + "\n")
    recs, summary = inspect_json("--data", str(path))
    assert [r["status"] for r in recs] == ["ok", "error", "error", "error", "error", "error"]
    assert f"{path}:2" in recs[1]["error"] and "missing.png" in recs[2]["error"]
    assert recs[3]["id"] == "empty" and "empty" in recs[3]["error"] and "truncated" in recs[4]["error"]
    assert summary["reasons"] == {"bad_json": 1, "missing_image": 1, "empty_image": 1, "truncated_image": 1, "too_long": 1}
    recs, summary = inspect_json("--data", str(path), "--set", "data.on_error=skip", "--set", "data.truncate=true")
    assert [r["status"] for r in recs] == ["ok", "skipped", "skipped", "skipped", "skipped", "ok"]
    assert recs[-1]["truncated"] is True and recs[-1]["tokens"] == 4096
    assert summary["skipped"] == 4 and summary["truncated"] == 1


def test_bench_data_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = run_tool("tools/bench_data.py", "--num-images", "3", "--repeats", "1", "--packer-items", "20000",
                   "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["images"]] == ["pil", "dali"] and all(r["images_per_s"] > 0 for r in data["images"])
    assert data["packer"][0]["impl"] == "native" and data["packer"][0]["identical_packs"] is True
