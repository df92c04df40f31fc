"""Distributed start-up: torchrun / Slurm env -> torch.distributed -> megatron parallel state.

The only place that creates process groups. Model code receives a `ProcessGroupCollection`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from engine.parallel import cpu_compat, megatron_fixes


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def read_dist_env() -> DistEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or, under plain srun, SLURM_*."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT", "29500")
    return DistEnv(rank, world, local, addr, port)


def seed_everything(seed: int) -> None:
    """Same seed for python/numpy/torch on every rank; megatron's TP offsets come on top."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def initialize(parallel_cfg, seed: int = 1234, timeout_minutes: int = 30):
    """Init torch.distributed (NCCL on GPU, gloo on CPU) and megatron's TP/PP/DP groups.

    Returns the megatron `ProcessGroupCollection` to pass to model builders.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.activate()
    megatron_fixes.apply()
    denv = read_dist_env()
    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    if denv.world_size % (tp * pp):
        raise ValueError(
            f"world size {denv.world_size} is not divisible by TP x PP = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes or change parallel.*_size"
        )
    backend = parallel_cfg.backend if parallel_cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(denv.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", denv.master_addr)
        os.environ.setdefault("MASTER_PORT", denv.master_port)
        dist.init_process_group(
            backend=backend,
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = getattr(parallel_cfg, "virtual_pipeline_model_parallel_size", 1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,  # selects the interleaved schedule
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=cuda,  # on CPU the default groups are gloo already
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():  # a vLLM rollout engine's close() may already have destroyed the world
        dist.barrier()
        dist.destroy_process_group()
