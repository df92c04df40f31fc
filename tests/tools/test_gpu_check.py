"""tools/gpu_check.sh --dry-run: the GPU check's whole sequence on the CPU at tiny shapes, with its JSON outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers.torchrun import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_report(tmp_path):
    out = tmp_path / "gpu_check"
    with socket.socket() as taken:  # a rendezvous port inherited from the caller and already in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "420",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken.getsockname()[1])}
        proc = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--dry-run"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["rc"] for s in summary["steps"]}
    assert steps == {"env": 0, "data": 0, "tiny_sft": 0, "packed": 0, "kernels": 0, "bench_kernels": 0,
                     "bench_train_step": 0}, (summary, proc.stdout[-3000:])
    assert summary["ok"] and summary["dry_run"] and summary["env"]["device"] == "cpu"

    sft = json.loads((out / "tiny_sft.json").read_text())
    assert sft["steps"] == 3 and sft["first_loss"] > 0 and 0 < sft["pack_fill"] <= 1

    suite = ET.parse(out / "packed_test.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0 and int(suite.get("tests")) >= 6

    rows = json.loads((out / "bench_kernels.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert any(r.get("impl") == "triton" and r.get("status", "ok") == "ok" for r in rows)

    step = json.loads((out / "bench_train_step.json").read_text())
    assert step["attention"] == "SDPAttention" and step["placed_on"] == step["compute_device"] == "cpu"
    assert step["step_time_s"] > 0 and step["model_tflops_per_step"] > 0 and step["mfu"] is None  # no CPU peak
    assert len(step["step_times_s"]) == 2 and all(l == l for l in step["losses"])  # finite (not NaN)
