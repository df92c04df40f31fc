"""tools/evaluate.py: pass@1 per decoding mode on an RL-format file (native engine, tiny random model)."""

import json
import subprocess
import sys

import pytest

from tests.helpers.torchrun import REPO, free_port

pytestmark = pytest.mark.slow


def test_evaluate_reports_every_mode(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(data), "--num", "10", "--seed", "3"],
                   cwd=REPO, check=True, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "tools/evaluate.py", "--config", "recipes/tiny_cpu_grpo.yaml", "--data", str(data / "rl.jsonl"),
           "--modes", "think", "nothink", "nowait", "budget", "--budget", "4", "--k", "2",
           "--max-tokens", "8", "--json", "rollout.backend=native"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    results = json.loads(line)["results"]
    assert set(results) == {"think", "nothink", "nowait", "budget"}
    for mode, r in results.items():
        # every prompt of the file: the recipe's data.max_samples (8, its training pool) does not cut a benchmark
        assert r["samples"] == 20 and 0.0 <= r["pass@1"] <= 1.0, (mode, r)
        assert 0 < r["mean_length"] <= (8 + 4 + 8 if mode == "budget" else 8), (mode, r)
