"""Optimizer (megatron's, distributed or not) and the LR schedule from the typed config."""

from __future__ import annotations

import math

from engine.model.transformer_configs import torch_dtype


def build_optimizer(cfg, model_chunks):
    """Adam(W) with fp32 master weights for bf16 params, grad clipping, optional DP-sharded state."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch_dtype(cfg.model.params_dtype)
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.optim.lr,
        min_lr=cfg.optim.min_lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.adam_beta1,
        adam_beta2=cfg.optim.adam_beta2,
        adam_eps=cfg.optim.adam_eps,
        clip_grad=cfg.optim.clip_grad,
        bf16=dtype.is_floating_point and dtype == torch_dtype("bfloat16"),
        fp16=dtype == torch_dtype("float16"),
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, model_chunks, use_gloo_process_groups=False)


def lr_at(step: int, cfg) -> float:
    """LR for optimizer step `step` (0-based): linear warmup by ratio, then cosine/linear/constant decay."""
    o, total = cfg.optim, max(cfg.train.max_steps, 1)
    warmup = int(round(o.warmup_ratio * total))
    if warmup and step < warmup:
        return o.lr * (step + 1) / warmup
    if o.decay_style == "constant":
        return o.lr
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    if o.decay_style == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1.0 - progress)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
