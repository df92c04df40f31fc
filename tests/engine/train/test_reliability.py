"""Faults tried end to end on the tiny SFT recipe, 2 gloo processes (docs/reliability.md lists them all):
re-running into a run dir, a damaged latest checkpoint, skip counts over ranks and resumes, every image
failing to decode, SIGTERM to the whole launch, a full disk, init_from with another model config, one-line
errors with exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, free_port

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cmd(run_dir: Path, *extra: str) -> list[str]:
    """The tiny SFT recipe under tools/launch.py (torchrun's arguments, pre-emption-safe SIGTERM, the failed
    worker's exit code)."""
    return [sys.executable, "tools/launch.py", "--nproc_per_node=2", f"--master_port={free_port()}", "tools/pretrain_vlm.py",
            "--config", "recipes/tiny_cpu_sft.yaml", f"train.run_dir={run_dir}", *extra]


def run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(out: str) -> list[str]:
    """The engine's error lines ("error: ..." or "[rank N] error: ..."), also where a progress bar left no newline."""
    return re.findall(r"(?:^|(?<=[\]\r\n]))((?:\[rank \d+\] )?error: [^\r\n]*)", out, re.M)


@pytest.fixture(scope="module")
def mixed_data(demo_data, tmp_path_factory) -> Path:
    """The demo SFT set with every 7th sample's image damaged (header intact) and every 11th a bad line."""
    d = tmp_path_factory.mktemp("mixed")
    good = next((demo_data / "images").glob("*.png")).read_bytes()
    (d / "broken.png").write_bytes(good[:100] + bytes(len(good) - 112) + good[-12:])
    rows = []
    for k, line in enumerate((demo_data / "sft.jsonl").read_text().splitlines()):
        row = json.loads(line)
        row["image"] = str(demo_data / row["image"])
        if k % 7 == 3:
            row["image"] = str(d / "broken.png")
        if k % 11 == 5:
            row["conversations"] = []
        rows.append(json.dumps(row))
    (d / "sft.jsonl").write_text("\n".join(rows) + "\n")
    return d / "sft.jsonl"


@pytest.fixture(scope="module")
def straight(mixed_data, tmp_path_factory) -> Path:
    """6 steps with on_error=skip, checkpoints at 3 and 6: the reference run."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run(cmd(run_dir, f"data.train_path={mixed_data}", "data.on_error=skip", "train.max_steps=6",
                   "train.save_interval=3"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


def _expected_skips(mixed_data: Path, steps: int) -> dict:
    """What both DP ranks' data iterators skip in `steps` steps (2 micro-batches each), summed."""
    from engine.config import load_config
    from engine.data.loader import build_train_iterator

    cfg = load_config(REPO / "recipes" / "tiny_cpu_sft.yaml", [f"data.train_path={mixed_data}", "data.on_error=skip"])
    total: dict = {}
    for rank in range(2):
        it = build_train_iterator(cfg, dp_rank=rank, dp_size=2)
        for _ in range(steps * cfg.train.num_microbatches(2)):
            next(it)
        for k, v in it.skips.counts.items():
            total[k] = total.get(k, 0) + v
    return total


def test_skip_counts_are_summed_over_ranks(straight, mixed_data):
    recs = records(straight)
    assert recs[-1]["data_skipped"] == _expected_skips(mixed_data, 6)
    assert set(recs[-1]["data_skipped"]) == {"bad_field", "corrupt_image"}


def test_a_damaged_latest_checkpoint_falls_back_and_resumes_bit_exactly(straight, mixed_data, tmp_path):
    """4 KiB of bit-rot in the latest checkpoint's shard: --resume auto warns, takes step 3, and redoes steps 4-6
    exactly as the uninterrupted run did (losses and the skip counts carried across the resume)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shard = run_dir / "checkpoints" / "step_000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    shard.write_bytes(bytes(data))
    proc = run(cmd(run_dir, f"data.train_path={mixed_data}", "data.on_error=skip", "train.max_steps=6",
                   "train.save_interval=3", "--resume", "auto"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "step_000006 is damaged: __0_0.distcp does not match its sha256" in out
    assert "resuming from step_000003, the newest intact checkpoint" in out
    ref, got = records(straight), records(run_dir)
    assert [(r["step"], r["loss"], r["data_skipped"]) for r in got] == [(r["step"], r["loss"], r["data_skipped"])
                                                                         for r in ref]


def test_rerun_into_a_run_dir_is_refused_and_overwrite_starts_afresh(straight, mixed_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run(cmd(run_dir, f"data.train_path={mixed_data}", "train.max_steps=2"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert error_lines(out) == [f"error: train.run_dir={run_dir} already holds a run (checkpoints, metrics.jsonl). "
                                "Continue it with --resume auto, start a new run with another train.run_dir, or pass "
                                "--overwrite to delete that run's outputs first"]
    assert (run_dir / "metrics.jsonl").read_text() == before and (run_dir / "checkpoints" / "step_000006").is_dir()
    proc = run(cmd(run_dir, f"data.train_path={mixed_data}", "data.on_error=skip", "train.max_steps=2",
                   "--overwrite"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert [r["step"] for r in records(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


def test_every_image_failing_skips_each_step_without_a_weight_change_then_stops(demo_data, tmp_path):
    """data.on_error=skip and no image decodes: each step is skipped and counted (weight decay is on, yet the
    model and optimizer state stay bit for bit the same), and after one epoch the run stops: exit 3, one line
    naming the file."""
    d = tmp_path / "data"
    d.mkdir()
    good = next((demo_data / "images").glob("*.png")).read_bytes()
    (d / "broken.png").write_bytes(good[:100] + bytes(len(good) - 112) + good[-12:])
    rows = [json.loads(line) for line in (demo_data / "sft.jsonl").read_text().splitlines()[:40]]  # a short epoch
    (d / "sft.jsonl").write_text("".join(json.dumps({**r, "image": "broken.png"}) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    proc = run(cmd(run_dir, f"data.train_path={d / 'sft.jsonl'}", "data.on_error=skip", "train.max_steps=50",
                   "train.save_interval=1", "train.keep_checkpoints=0", "optim.weight_decay=0.1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    lines = error_lines(out)
    assert lines and all(f"no sample of this rank's shard of {d / 'sft.jsonl'} could be loaded in epoch 0" in line
                         for line in lines) and "Traceback" not in out, out[-3000:]
    recs = records(run_dir)
    assert all(r["skipped"] for r in recs) and [r["empty_steps"] for r in recs] == list(range(1, len(recs) + 1))
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(steps) >= 2
    first, last = (json.loads((s / "checksums.json").read_text())["files"] for s in (steps[0], steps[-1]))
    shards = sorted(k for k in first if k.endswith(".distcp"))
    assert shards and all(first[k]["sha256"] == last[k]["sha256"] for k in shards)  # model + optimizer unchanged


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigterm_to_the_whole_launch_checkpoints_and_exits_zero(demo_data, tmp_path):
    """Slurm signals every process of the step, the launcher included: the run saves and the launch exits 0.
    (torchrun itself exits 1 here: its agent turns SIGTERM into an exception, docs/reliability.md.)"""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cmd(run_dir, f"data.train_path={demo_data / 'sft.jsonl'}", "train.max_steps=200"),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for_step(run_dir, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    step = records(run_dir)[-1]["step"]
    assert "SIGTERM: saved step" in out and (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:06d}"


def _can_mount_a_small_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not _can_mount_a_small_tmpfs(),
                    reason="needs unprivileged user+mount namespaces to mount a small tmpfs (test_checkpoint_integrity "
                           "covers the full-disk path with RLIMIT_FSIZE)")
def test_a_full_disk_stops_with_one_line_and_no_partial_checkpoint(demo_data, tmp_path):
    """The run dir on a 12 MiB tmpfs (a user+mount namespace, no root needed): the first checkpoint (~20 MiB)
    does not fit. Exit 4, "disk full", the partial dir removed, nothing hangs."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    launch = " ".join(f"'{a}'" for a in cmd(mount / "run", f"data.train_path={demo_data / 'sft.jsonl'}",
                                            "train.max_steps=4", "train.save_interval=2"))
    script = (f"mount -t tmpfs -o size=12m tmpfs '{mount}' && {launch}; code=$?; "
              f"echo \"LEFT: $(ls -A '{mount}/run/checkpoints')\"; exit $code")
    proc = run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and "disk full while writing" in lines[0] and "step_000002.partial was removed" in lines[0]
    assert proc.stdout.strip().splitlines()[-1] == "LEFT:"  # the checkpoints dir is empty: no partial left


def test_init_from_a_checkpoint_of_another_model_config_is_refused(straight, demo_data, tmp_path):
    proc = run(cmd(tmp_path / "run", f"data.train_path={demo_data / 'sft.jsonl'}", "train.max_steps=1",
                   f"train.init_from={straight}", "model.llm.rope_theta=20000"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert "model.llm.rope_theta: checkpoint 10000.0, config 20000.0" in out
    assert "train.init_from_allow=[model.llm.rope_theta]" in out and "Traceback" not in out


def test_config_errors_are_one_line_with_the_allowed_range(tmp_path):
    proc = run([sys.executable, "tools/pretrain_vlm.py", "--config", "recipes/tiny_cpu_sft.yaml",
                f"train.run_dir={tmp_path}", "train.log_interval=0"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config: recipes/tiny_cpu_sft.yaml: train.log_interval=0 is outside the allowed range [1, inf): "
        "steps between metric lines"]
