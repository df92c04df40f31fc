"""Every stage's tiny recipe trains on 2 processes and its loss goes down; fault handling works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.engine.train.test_resume import finish, wait_for_step
from tests.helpers.torchrun import REPO, free_port

pytestmark = pytest.mark.slow


def run_recipe(recipe: str, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "tools/pretrain_vlm.py", "--config", f"recipes/{recipe}.yaml", f"train.run_dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


STAGES = {
    "tiny_cpu_sft": ("sft.jsonl", ["train.max_steps=10"]),
    "tiny_cpu_align": ("sft.jsonl", ["train.max_steps=10"]),
    "tiny_cpu_mpo": ("preference.jsonl", ["train.max_steps=8"]),
    "tiny_cpu_connector": ("sft.jsonl", ["train.max_steps=8", "train.early_stopping_patience=0"]),
}


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_stage_recipe_trains_and_loss_goes_down(recipe, demo_data, demo_valid_data, tmp_path):
    data_file, overrides = STAGES[recipe]
    extra = [f"data.train_path={demo_data / data_file}"]
    if recipe == "tiny_cpu_connector":
        extra.append(f"data.valid_path={demo_valid_data / 'sft.jsonl'}")
    finish(run_recipe(recipe, tmp_path, overrides + extra))
    recs = records(tmp_path)
    losses = [r["loss"] for r in recs]
    assert len(losses) == int(overrides[0].split("=")[1])
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "memory_gb", "tflops_per_gpu"):
        assert key in recs[-1], key
    if recipe == "tiny_cpu_mpo":
        assert {"loss_pref", "loss_quality", "loss_gen", "reward_margin", "reward_accuracy", "delta"} <= set(recs[-1])
        assert recs[-1]["reward_margin"] > recs[0]["reward_margin"]
    if recipe == "tiny_cpu_connector":
        assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4, 6, 8]


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(demo_data, tmp_path):
    proc = run_recipe("tiny_cpu_sft", tmp_path, [f"data.train_path={demo_data / 'sft.jsonl'}", "train.max_steps=10",
                                                   "optim.lr=1e30", "optim.warmup_ratio=0", "train.max_bad_steps=3"])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss" in out and "Lower optim.lr" in out
    recs = records(tmp_path)
    assert [r["skipped"] for r in recs] == [False, True, True, True]
    assert recs[-1]["skipped_steps"] == 3
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_sigterm_checkpoints_and_exits_zero(demo_data, tmp_path):
    proc = run_recipe("tiny_cpu_sft", tmp_path, [f"data.train_path={demo_data / 'sft.jsonl'}", "train.max_steps=200"])
    wait_for_step(tmp_path, 2, proc)
    # Slurm's pre-emption SIGTERM reaching the training ranks (torchrun forwards it the same way).
    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    step = max(r["step"] for r in records(tmp_path))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    assert step < 200 and "SIGTERM: saved step" in out


def test_early_stopping_on_validation_loss(demo_data, tmp_path):
    """With the LR at 0 the validation loss cannot improve after the first eval: stop after `patience` evals."""
    proc = run_recipe("tiny_cpu_connector", tmp_path, [
        f"data.train_path={demo_data / 'sft.jsonl'}", f"data.valid_path={demo_data / 'sft.jsonl'}",
        "train.max_steps=50", "optim.lr=1e-12", "optim.min_lr=0", "train.early_stopping_patience=2"])
    out = finish(proc)
    recs = records(tmp_path)
    assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4, 6]
    assert recs[-1]["early_stop"] is True and "early stopping at step 6" in out
