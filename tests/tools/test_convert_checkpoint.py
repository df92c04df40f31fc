"""The conversion and parity CLIs as a user runs them: real processes, real files, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint.convert import open_source  # engine before transformers: its kernels set up Triton first
from tests.helpers.torchrun import REPO, free_port, torchrun

pytestmark = pytest.mark.slow
CONVERT = "tools/convert_checkpoint.py"
PARITY = "tools/check_hf_parity.py"


def run(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    from tests.engine.checkpoint.tiny_hf import make_internvl, make_qwen2, write_chat_layout

    root = tmp_path_factory.mktemp("hf")
    nat = make_internvl(root / "nat", vocab=301, tied=False)
    return {"root": root, "nat": nat, "chat": write_chat_layout(nat, root / "chat"),
            "qwen": make_qwen2(root / "qwen", vocab=333, salt="q", image_token_id=331, seed=3)}


@pytest.fixture(scope="module")
def converted(hf) -> Path:
    out = hf["root"] / "mc"
    stale = hf["root"] / "mc.partial"  # what a killed earlier conversion leaves behind
    stale.mkdir()
    (stale / "junk").write_text("x")
    proc = run(CONVERT, "hf-to-mcore", "--hf-dir", hf["nat"], "--out", out, "--tp", 1, "--pp", 1, "--report-memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["command"] == "hf-to-mcore" and report["peak_rss_bytes"] > 0
    return out


def test_hf_to_mcore_writes_a_complete_checkpoint(hf, converted):
    assert not (hf["root"] / "mc.partial").exists()
    meta = json.loads((converted / "engine_checkpoint.json").read_text())
    assert meta["tokenizer_path"] == "hf_files" and (converted / "hf_files" / "tokenizer.json").is_file()
    assert meta["written_at"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    assert meta["model"]["llm"]["vocab_size"] == 301 and meta["hf_layout"] == "internvl"
    assert list(converted.glob("*.distcp")) and (converted / "metadata.json").is_file()


def test_refuses_to_overwrite_without_force(hf, converted):
    before = sorted(p.name for p in converted.iterdir())
    proc = run(CONVERT, "hf-to-mcore", "--hf-dir", hf["nat"], "--out", converted)
    assert proc.returncode == 2 and "pass --force" in proc.stderr
    assert sorted(p.name for p in converted.iterdir()) == before


def test_mcore_to_hf_with_force_replaces_output_and_shows_progress(hf, converted):
    out = hf["root"] / "export_chat"
    out.mkdir()
    (out / "old_file").write_text("x")
    proc = run(CONVERT, "mcore-to-hf", "--ckpt", converted, "--out", out, "--layout", "internvl_chat", "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mcore -> hf" in proc.stderr  # the progress bar
    assert not (out / "old_file").exists() and (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["img_context_token_id"] == 299


def test_assemble_reports_tokenizer_mismatch_and_records_sources(hf):
    out = hf["root"] / "assembled"
    proc = run(CONVERT, "assemble", "--vision", hf["nat"], "--connector", "init", "--llm", hf["qwen"], "--out", out,
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: tokenizer mismatch" in proc.stderr
    meta = json.loads((out / "engine_checkpoint.json").read_text())
    assert meta["sources"]["projector"] == "init" and meta["model"]["image_token_id"] == 331
    assert meta["model"]["llm"]["vocab_size"] == 333 and meta["hf_config"] is None


def test_missing_shard_is_a_clear_error(hf):
    import shutil

    broken = hf["root"] / "broken"
    shutil.copytree(hf["qwen"], broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(broken / "model-00001-of-00002.safetensors"), "pt") as f:
        keys = list(f.keys())
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"  # never downloaded
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    proc = run(CONVERT, "hf-to-mcore", "--hf-dir", broken, "--out", hf["root"] / "never", "--no-progress")
    assert proc.returncode == 2
    assert "model-00002-of-00002.safetensors" in proc.stderr and "re-download the missing shard" in proc.stderr
    assert not (hf["root"] / "never").exists() and not (hf["root"] / "never.partial").exists()


def test_parity_tool_exits_1_above_tolerance(hf):
    proc = run(PARITY, "--hf-dir", hf["nat"], "--tol", "0")  # fp32 differs by ~1e-6, so tol 0 must fail
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAIL" in proc.stdout and "max |dlogit|" in proc.stdout


def test_parity_tool_under_torchrun_tp2_on_chat_layout(hf):
    proc = torchrun(REPO / PARITY, ["--hf-dir", str(hf["chat"]), "--tp", "2", "--json"], nproc=2, timeout=180)
    r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert r["passed"] and r["tp"] == 2 and r["layout"] == "internvl_chat" and r["max_abs_logit_diff"] <= 1e-4


def _listing(d: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*") if p.is_file())


def test_no_direction_writes_over_its_own_input(hf, converted):
    """--out equal to, inside, or around an input -- directly or through a symlink -- is refused (exit 2)
    before anything is written, even with --force; the input is left as it was."""
    ckpt_before, hf_before = _listing(converted), _listing(hf["nat"])
    link = hf["root"] / "mc_link"
    link.symlink_to(converted)
    runs = {
        "mcore-to-hf same": (["mcore-to-hf", "--ckpt", converted, "--out", converted, "--layout", "internvl"], "is the --ckpt"),
        "mcore-to-hf symlink": (["mcore-to-hf", "--ckpt", converted, "--out", link, "--layout", "internvl"], "is the --ckpt"),
        "mcore-to-hf inside": (["mcore-to-hf", "--ckpt", converted, "--out", converted / "hf", "--layout", "qwen2"],
                               "inside the --ckpt"),
        "hf-to-mcore same": (["hf-to-mcore", "--hf-dir", hf["nat"], "--out", hf["nat"]], "is the source of the vision/projector/llm"),
        "assemble around": (["assemble", "--vision", hf["nat"], "--connector", "init", "--llm", hf["qwen"], "--out", hf["root"]],
                            "contains the source of the vision"),
    }
    for name, (args, match) in runs.items():
        proc = run(CONVERT, *args, "--force", "--no-progress")
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert match in proc.stderr and "outside every input" in proc.stderr, (name, proc.stderr[-2000:])
    assert _listing(converted) == ckpt_before and _listing(hf["nat"]) == hf_before
    assert not (hf["root"] / "mc.partial").exists() and not list(hf["root"].glob("*.replaced"))


def _recipe(path: Path, model: dict) -> Path:
    """A valid recipe: the tiny CPU SFT recipe with the given model section on top."""
    import yaml

    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "tiny_cpu_sft.yaml"), "model": model,
                                    "data": {"tile_size": 56, "max_tiles": 1},
                                    "train": {"seq_length": 512}}))
    return path


def test_check_recipe_lists_the_model_fields_a_recipe_gets_wrong(hf):
    md = open_source(hf["nat"]).model_dict  # what hf-to-mcore makes of the checkpoint's config.json
    same = _recipe(hf["root"] / "same.yaml", md)
    proc = run(CONVERT, "check-recipe", "--hf-dir", hf["nat"], "--config", same)
    assert proc.returncode == 0 and "OK:" in proc.stderr, proc.stderr[-2000:]
    wrong = _recipe(hf["root"] / "wrong.yaml", {**md, "llm": {**md["llm"], "norm_eps": 1e-5, "max_position_embeddings": 1024},
                                                "vision": {**md["vision"], "qk_norm": True}})
    proc = run(CONVERT, "check-recipe", "--hf-dir", hf["nat"], "--config", wrong, "model.llm.rope_theta=5e5")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "model.vision.qk_norm: checkpoint False, recipe True",
        "model.llm.rope_theta: checkpoint 10000.0, recipe 500000.0",
        "model.llm.max_position_embeddings: checkpoint 512, recipe 1024",
        "model.llm.norm_eps: checkpoint 1e-06, recipe 1e-05",
    ], proc.stdout
    # an LLM-only checkpoint checks the LLM fields alone (the recipe's vision encoder is not its business)
    proc = run(CONVERT, "check-recipe", "--hf-dir", hf["qwen"], "--config", wrong)
    assert proc.returncode == 1 and all(line.startswith("model.llm.") for line in proc.stdout.splitlines()), proc.stdout
