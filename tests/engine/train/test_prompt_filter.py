"""SSB offline mode in the GRPO trainer: exhausted prompts are skipped before rollout, counted, and the
surplus waits for the next episode; a pool with nothing left to learn is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.loader import build_rl_prompt_iterator
from engine.data.visual_reasoning import write_demo_set
from engine.rl.sample_buffer import PromptPoolFilter
from engine.train.grpo_episode import PromptSource
from tests.engine.data.data_testutils import tiny_config

PER_EPISODE = 3


def _source(tmp_path, n_prompts=8) -> PromptSource:
    """GRPO's prompt draw: the real prompt iterator and filter, no model or process groups."""
    write_demo_set(tmp_path, n_prompts, seed=0)
    cfg = tiny_config(train_path=str(tmp_path / "rl.jsonl"), format="rl", packing=False, shuffle=False)
    data = build_rl_prompt_iterator(cfg, PER_EPISODE)
    return PromptSource(data, PER_EPISODE, PromptPoolFilter(1), data.ctx.tokenizer.pad_id)


def _ids(batch) -> list[str]:
    return [s[0] for s in batch["sample_ids"]]


def test_exhausted_prompts_are_skipped_and_counted(tmp_path):
    t = _source(tmp_path)
    all_ids = [json.loads(line)["id"] for line in (tmp_path / "rl.jsonl").read_text().splitlines()]  # unshuffled
    first = t.next()
    assert _ids(first) == all_ids[:3] and t.filtered == 0
    t.filter.record(all_ids[3], torch.zeros(4))  # no signal: skip it
    t.filter.record(all_ids[4], torch.tensor([0.5, -0.5, 0.0, 0.0]))  # signal: keep it
    second = t.next()
    assert _ids(second) == [all_ids[4], all_ids[5], all_ids[6]] and t.filtered == 1
    assert [b["sample_ids"][row][0] for b, row in t.pending] == [all_ids[7]]  # the last batch's surplus waits
    assert _ids(t.next())[0] == all_ids[7]
    assert int(second["tiles_per_row"].sum()) == second["pixel_values"].shape[0]


def test_a_pool_with_nothing_to_learn_is_an_error(tmp_path):
    t = _source(tmp_path, n_prompts=6)
    for _ in range(2):
        for pid in _ids(t.next()):
            t.filter.record(pid, torch.zeros(4))
    with pytest.raises(RuntimeError, match="nothing left to learn"):
        t.next()
