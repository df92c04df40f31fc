"""`import kernels` picks the Triton mode by itself, and says what to do when it cannot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) behaviour")
def test_import_kernels_on_cpu_enables_the_interpreter_and_runs():
    proc = _python("import os, torch, kernels\n"
                   "assert os.environ['TRITON_INTERPRET'] == '1' and kernels.INTERPRET\n"
                   "lp, ent = kernels.fused_logprob_entropy(torch.randn(3, 50), torch.tensor([1, -100, 7]))\n"
                   "print(lp.tolist(), ent.tolist())")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) behaviour")
def test_triton_imported_first_gives_an_actionable_error():
    proc = _python("import triton\nimport kernels")
    assert proc.returncode != 0
    assert "Import `kernels` first, or export TRITON_INTERPRET=1" in proc.stderr
