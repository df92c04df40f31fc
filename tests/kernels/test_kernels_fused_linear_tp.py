"""The vocab-parallel fused-linear kernels on 2 gloo processes under torchrun equal the unsharded call
(outputs, dhidden, the dweight shard, d temperature), with vocab padding on the last shard."""

from pathlib import Path

import pytest

from tests.helpers.torchrun import torchrun

WORKER = Path(__file__).with_name("kernels_fused_linear_tp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fused_linear_tp2_matches_unsharded(dtype_name):
    proc = torchrun(WORKER, [dtype_name], nproc=2, timeout=300)
    assert proc.stdout.count(": ok") == 2, proc.stdout[-2000:]
