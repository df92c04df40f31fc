"""Every 38B report recipe sets up at its world size: each pipeline stage built on the meta device under a fake
process group of that size (tools/check_layout.py), layers, shards and static memory per GPU checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.torchrun import REPO

# GPUs per recipe: the PP=4 layouts for the 64-node job of recipes/slurm/r1v2_38b_sft.sbatch, GRPO on 32 nodes
# (TP=8, PP=1: DP=32 divides its 32 prompts per episode), AL-CoTD distillation (generation only) on 8 nodes
WORLD = {
    "r1v_mlp_init": 512, "r1v_modality_alignment": 512, "r1v_iterative_sft": 512, "r1v_alcotd": 64,
    "r1v_grpo": 256, "r1v2_sft": 512, "r1v2_mpo": 512, "r1v2_grpo": 256, "r1v3_cold_start_sft": 512,
    "r1v3_connector_tuning": 512, "r1v3_grpo": 256,
}
H100_GIB = 74.5  # 80e9 bytes
ACTIVATION_RESERVE_GIB = 25  # 16k-token activations with SP + recompute, logits, workspace (docs/gpu.md)


def test_every_report_recipe_is_listed():
    recipes = {p.stem for p in (REPO / "recipes").glob("*.yaml") if not p.stem.startswith("tiny_")}
    assert recipes == set(WORLD)


@pytest.mark.slow
def test_38b_recipes_set_up_on_meta_at_their_world_sizes(tmp_path):
    out = tmp_path / "layout.json"
    args = [a for name, world in WORLD.items() for a in ("--config", f"recipes/{name}.yaml", "--world-size", str(world))]
    proc = subprocess.run([sys.executable, "tools/check_layout.py", *args, "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = {r["recipe"].split("/")[-1][:-5]: r for r in json.loads(out.read_text())}
    for name, r in reports.items():
        assert r["problems"] == [] and all(s["problems"] == [] for s in r["stages"]), name
        assert r["tp"] * r["pp"] * r["dp"] == WORLD[name]
        assert 38.5e9 < r["total_params"] < 39.5e9, name  # InternViT-6B (32 padded heads) + MLP + Qwen2.5-32B
        layers = [n for s in r["stages"] for n in s["layers"]]
        assert layers == list(range(1, 65)), name
        assert r["stages"][0]["has_vision"] and r["stages"][-1]["has_output_layer"]
        assert r["max_static_gib"] + ACTIVATION_RESERVE_GIB < H100_GIB, (name, r["max_static_gib"])
        if name == "r1v_alcotd":
            continue  # the generation job: its DP size is free
        if "grpo" in name:
            assert (r["tp"], r["pp"], r["dp"]) == (8, 1, 32), name  # grpo.py rejects PP > 1
        else:
            assert (r["tp"], r["pp"], r["dp"]) == (8, 4, 16), name
            assert all(s["has_vision"] == (s["stage"] == 0) for s in r["stages"])
    # what the GRPO recipes' comments state (r1v2 keeps the KL reference, the others do not)
    assert round(reports["r1v3_grpo"]["max_static_gib"], 1) == 28.9
    assert round(reports["r1v2_grpo"]["max_static_gib"], 1) == 38.0


def test_pp4_grpo_is_reported(tmp_path):
    proc = subprocess.run([sys.executable, "tools/check_layout.py", "--config", "recipes/r1v3_grpo.yaml",
                           "--world-size", "8", "parallel.pipeline_model_parallel_size=4",
                           "parallel.tensor_model_parallel_size=2", "model.vision.padded_num_heads=26",
                           "model.llm.num_layers=4", "model.vision.num_layers=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "GRPO runs with PP=1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
