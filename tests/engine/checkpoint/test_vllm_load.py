"""vLLM loads what mcore-to-hf writes (native InternVL, with an image) and agrees with transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")]


def test_vllm_generates_like_transformers_from_exported_internvl(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_worker.py")), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert len(r["transformers_on_source"]) == 8 and r["image_effect_on_logits"] > 1e-3, r
    assert r["vllm_on_export"] == r["transformers_on_source"], r
