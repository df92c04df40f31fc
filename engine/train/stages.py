"""Dispatch `train.stage` to its loop."""

from __future__ import annotations


def run_stage(cfg, resume: str | None = None, overwrite: bool = False) -> int:
    """`resume`: None (a new run; refused in a run dir that holds another run unless `overwrite`), "auto" or a
    checkpoint path."""
    from engine.train.run_dir import prepare_run_dir

    prepare_run_dir(cfg.train.run_dir, resume, overwrite)
    stage = cfg.train.stage
    if stage in ("sft", "align", "connector"):
        from engine.train.trainer import run

        return run(cfg, resume=resume)
    if stage == "mpo":
        from engine.train.mpo import run

        return run(cfg, resume=resume)
    if stage == "iterative_sft":
        from engine.train.iterative_sft import run

        return run(cfg, resume=resume)
    if stage == "grpo":
        from engine.train.grpo import run

        return run(cfg, resume=resume)
    raise NotImplementedError(
        f"train.stage={stage} is not wired into tools/pretrain_vlm.py yet; the supported stages are sft, align, connector, mpo, iterative_sft, grpo"
    )
