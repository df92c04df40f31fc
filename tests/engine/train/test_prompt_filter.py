"""SSB offline mode in the GRPO trainer: exhausted prompts are skipped before rollout, counted, and the
surplus waits for the next episode; a pool with nothing left to learn is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.loader import build_rl_prompt_iterator
from engine.data.visual_reasoning import write_demo_set
from engine.rl.sample_buffer import PromptPoolFilter
from engine.train.grpo import GRPOTrainer
from tests.engine.data.data_testutils import tiny_config

PER_EPISODE = 3


def _trainer(tmp_path, n_prompts=8) -> GRPOTrainer:
    """Only what _next_prompts uses: the real prompt iterator and filter, no model or process groups."""
    write_demo_set(tmp_path, n_prompts, seed=0)
    cfg = tiny_config(train_path=str(tmp_path / "rl.jsonl"), format="rl", packing=False, shuffle=False)
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.data = build_rl_prompt_iterator(cfg, PER_EPISODE)
    t.prompts_per_rank, t.prompt_filter, t.pending_prompts, t.prompts_filtered = PER_EPISODE, PromptPoolFilter(1), [], 0
    return t


def _ids(batch) -> list[str]:
    return [s[0] for s in batch["sample_ids"]]


def test_exhausted_prompts_are_skipped_and_counted(tmp_path):
    t = _trainer(tmp_path)
    all_ids = [json.loads(line)["id"] for line in (tmp_path / "rl.jsonl").read_text().splitlines()]  # unshuffled
    first = t._next_prompts()
    assert _ids(first) == all_ids[:3] and t.prompts_filtered == 0
    t.prompt_filter.record(all_ids[3], torch.zeros(4))  # no signal: skip it
    t.prompt_filter.record(all_ids[4], torch.tensor([0.5, -0.5, 0.0, 0.0]))  # signal: keep it
    second = t._next_prompts()
    assert _ids(second) == [all_ids[4], all_ids[5], all_ids[6]] and t.prompts_filtered == 1
    assert [b["sample_ids"][row][0] for b, row in t.pending_prompts] == [all_ids[7]]  # the last batch's surplus waits
    assert _ids(t._next_prompts())[0] == all_ids[7]
    assert int(second["tiles_per_row"].sum()) == second["pixel_values"].shape[0]


def test_a_pool_with_nothing_to_learn_is_an_error(tmp_path):
    t = _trainer(tmp_path, n_prompts=6)
    for _ in range(2):
        for pid in _ids(t._next_prompts()):
            t.prompt_filter.record(pid, torch.zeros(4))
    with pytest.raises(RuntimeError, match="nothing left to learn"):
        t._next_prompts()
