"""kill -9 mid-run + `--resume auto` reproduces the uninterrupted loss curve bit for bit (CPU, fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, free_port

pytestmark = pytest.mark.slow


def launch(run_dir: Path, data: Path, extra: list[str], resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "tools/pretrain_vlm.py", "--config", "recipes/tiny_cpu_sft.yaml",
           f"train.run_dir={run_dir}", f"data.train_path={data}", "train.max_steps=8", "train.save_interval=3", *extra]
    if resume:
        cmd += ["--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.parametrize("loss_impl", ["reference", "fused_linear"])
def test_kill9_and_resume_is_bit_identical(loss_impl, demo_data, tmp_path):
    data = demo_data / "sft.jsonl"
    extra = [f"train.loss_impl={loss_impl}"]  # fused_linear: the output layer fused into the loss (issue 15)
    finish(launch(tmp_path / "straight", data, extra))
    reference = losses(tmp_path / "straight")
    assert [s for s, _ in reference] == list(range(1, 9))

    run = tmp_path / "killed"
    proc = launch(run, data, extra)
    wait_for_step(run, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"

    finish(launch(run, data, extra, resume=True))
    assert losses(run) == reference  # exact float equality, every step


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(demo_data, tmp_path):
    """A half-written step_N.tmp (as a kill during saving leaves it) is ignored and cleaned on resume."""
    data = demo_data / "sft.jsonl"
    run = tmp_path / "run"
    finish(launch(run, data, ["train.max_steps=3"]))
    partial = run / "checkpoints" / "step_000006.tmp"
    partial.mkdir()
    (partial / "garbage").write_text("half a shard")
    out = finish(launch(run, data, ["train.max_steps=4"], resume=True))
    assert not partial.exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4], out[-2000:]


def test_resume_at_another_data_parallel_size(demo_data, tmp_path):
    """Model and optimizer reshard from DP=2 to DP=1 (the data order restarts, with a notice)."""
    data = demo_data / "sft.jsonl"
    finish(launch(tmp_path, data, ["train.max_steps=3"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "tools/pretrain_vlm.py", "--config", "recipes/tiny_cpu_sft.yaml", f"train.run_dir={tmp_path}",
           f"data.train_path={data}", "train.max_steps=5", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resumed at data-parallel size 1 (checkpoint: 2)" in out
    steps = [s for s, _ in losses(tmp_path)]
    assert steps == [1, 2, 3, 4, 5]
    # the resumed model continues from the trained one: its loss is far below the first step's
    assert losses(tmp_path)[3][1] < losses(tmp_path)[0][1] - 0.5
