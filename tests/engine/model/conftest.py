"""Single-process (world size 1, gloo) megatron state for model unit tests."""

import os

import pytest

from tests.helpers.torchrun import free_port


@pytest.fixture(scope="session")
def single_process_pg():
    import torch.distributed as dist

    from engine.config import ParallelConfig
    from engine.parallel.init import initialize

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    pg = initialize(ParallelConfig(), seed=1234)
    yield pg
    if dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
