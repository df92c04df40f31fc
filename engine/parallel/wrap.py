"""Wrap a built model for training: megatron DDP (grad buffers, DP reduction) + grad finalisation."""

from __future__ import annotations


def ddp_config(cfg, perf=None):
    """megatron DistributedDataParallelConfig from the typed config (`perf`: the resolved performance switches,
    default: resolved for this machine)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    perf = perf or cfg.performance.resolve(cfg)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/inf are handled (counted, step skipped) by the trainer
    )


def wrap_ddp(model, cfg, pg_collection):
    """megatron DistributedDataParallel around one model chunk; hooks the schedule's grad finalisation.

    overlap_grad_reduce: the schedule runs all but the last micro-batch under `no_sync`, the bucket hooks start
    each bucket's reduce as its last gradient arrives, finalize_model_grads waits for them.
    overlap_param_gather: the distributed optimizer's parameter all-gather starts in the next forward's
    pre-hooks; `sync_params` forces it where parameters are read outside a forward."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    tcfg = model.config
    ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_config(cfg), module=model, pg_collection=pg_collection)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp.no_sync
    return ddp


def wrap_ddp_chunks(chunks, cfg, pg_collection) -> list:
    """DDP around each virtual-pipeline chunk; the schedule reads the hooks from the first chunk's config."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    ddps = [DistributedDataParallel(config=c.config, ddp_config=ddp_config(cfg), module=c, pg_collection=pg_collection)
            for c in chunks]
    tcfg = chunks[0].config
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    return ddps


def sync_params(ddp) -> None:
    """Make every parameter current after an optimizer step (a no-op unless overlap_param_gather is on): call
    before reading parameters outside a forward pass (checkpoint save)."""
    if ddp.ddp_config.use_distributed_optimizer and ddp.ddp_config.overlap_param_gather:
        ddp.start_param_sync(force_sync=True)


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
