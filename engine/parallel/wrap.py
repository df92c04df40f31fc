"""Wrap a built model for training: megatron DDP (grad buffers, DP reduction) + grad finalisation."""

from __future__ import annotations


def wrap_ddp(model, cfg, pg_collection):
    """megatron DistributedDataParallel around one model chunk; hooks the schedule's grad finalisation."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    tcfg = model.config
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/inf are handled (counted, step skipped) by the trainer
    )
    ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=model, pg_collection=pg_collection)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp.no_sync
    return ddp


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
