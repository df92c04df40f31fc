"""engine/parallel/cpu_compat.py item 7: without CUDA, importing the engine makes megatron's jit fusions plain
functions before megatron is imported, so no worker process pays for torch.compile's machinery at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.torchrun import REPO

PROBE = """
import sys{first}
import engine.train.trainer, engine.train.grpo, engine.model.build  # what a training worker imports
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
print(jit.jit_fuser is jit.noop_decorator, "torch._dynamo" in sys.modules,
      hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"))  # wrapped by torch.compile?
"""


def _probe(first: str = "") -> list[str]:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE.format(first=first)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patch is CPU-only; on CUDA megatron keeps torch.compile")
def test_engine_import_leaves_megatron_fusions_eager_on_cpu():
    assert _probe() == ["True", "False", "False"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patch")
def test_megatron_imported_first_keeps_its_compiled_fusions():
    """The patch only acts before megatron's first import; afterwards it changes nothing (and says nothing)."""
    megatron_first = "\nimport os; os.environ['TRITON_INTERPRET'] = '1'\nimport megatron.core"
    assert _probe(megatron_first) == ["False", "True", "True"]
