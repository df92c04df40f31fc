"""`rollout.backend` -> a RolloutEngine for this process's model shards."""

from __future__ import annotations

from pathlib import Path

from engine.rollout.base import RolloutEngine


def build_rollout_engine(cfg, model, pg, *, tokenizer=None, tokenizer_dir: str | Path | None = None,
                         image_processor=None) -> RolloutEngine:
    """cfg: the root Config with a `rollout` section. Collective (every training rank calls it)."""
    rollout = cfg.rollout
    if rollout.backend == "native":
        from engine.rollout.native import NativeRolloutEngine

        return NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, rollout.max_model_len, tokenizer=tokenizer,
                                   max_batch_size=rollout.max_num_seqs, image_processor=image_processor,
                                   seed=rollout.seed)
    from engine.rollout.vllm_engine import VLLMRolloutEngine

    model_dir = rollout.model_dir or str(Path(cfg.train.run_dir) / "rollout_hf")
    if not cfg.model.text_only:
        tokenizer_dir = _write_processor(cfg, tokenizer_dir or cfg.data.tokenizer_path, Path(model_dir))
    return VLLMRolloutEngine.from_model(model, cfg, pg, model_dir, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer)


def _write_processor(cfg, tokenizer_dir: str | Path, model_dir: Path) -> Path:
    """vLLM tiles images itself with the HF processor files next to its tokenizer: write them (rank 0)."""
    import torch.distributed as dist

    from engine.rollout.processor import write_internvl_processor

    out = model_dir.with_name(model_dir.name + "_processor")
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_internvl_processor(out, tokenizer_dir, cfg.data, cfg.model.tokens_per_tile)
    if dist.is_initialized():
        dist.barrier()
    return out
