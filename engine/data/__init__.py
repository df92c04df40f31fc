"""Data path: JSONL formats -> chat template -> InternVL tiling (DALI or PIL) -> packing -> micro-batches.

Entry points (all take the root Config):
    build_train_iterator(cfg, dp_rank=0, dp_size=1, path=None, state=None) -> DataIterator
    build_rl_prompt_iterator(cfg, batch_size, dp_rank=0, dp_size=1, path=None, state=None) -> DataIterator
    build_data_context(cfg, path=None, fmt=None, check_model=True) -> DataContext
See docs/data.md for the formats and the batch contract (engine/data/batch.py).
"""

from engine.data.batch import cu_seqlens_from_segments
from engine.data.errors import DataError, SkipCounter
from engine.data.loader import DataContext, DataIterator, build_data_context, build_rl_prompt_iterator, build_train_iterator

__all__ = [
    "DataContext", "DataError", "DataIterator", "SkipCounter", "build_data_context", "build_rl_prompt_iterator",
    "build_train_iterator", "cu_seqlens_from_segments",
]
