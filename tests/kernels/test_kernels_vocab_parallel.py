"""Vocab-parallel kernels on 2 gloo processes give the unsharded call's outputs and gradients."""

import pytest
import torch.multiprocessing as mp

from kernels_tp_worker import run_rank

WORLD = 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_vocab_parallel_matches_unsharded(tmp_path, dtype_name):
    mp.spawn(run_rank, args=(WORLD, str(tmp_path / "dist_init"), dtype_name), nprocs=WORLD, join=True)
