import pytest
import torch

from engine.rl.dynamic_sampling import DynamicSampler, Group, assemble_batch, filter_groups, informative_groups


def test_informative_groups_and_filter():
    rewards = torch.tensor([1.0, 1.0, 1.0,  0.0, 1.0, 0.0,  0.0, 0.0, 0.0,  0.2, 0.2, 0.21])  # G=3
    assert informative_groups(rewards, 3).tolist() == [False, True, False, True]
    idx, dropped = filter_groups(rewards, 3)
    assert idx.tolist() == [3, 4, 5, 9, 10, 11] and dropped == 2
    assert informative_groups(rewards, 3, atol=0.05).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="multiple of group_size"):
        informative_groups(rewards, 5)


def _groups(pattern, start=0):
    """pattern: 'i' informative group, 's' all-same group."""
    return [Group(prompt_id=start + k, rewards=torch.tensor([0.0, 1.0] if c == "i" else [1.0, 1.0]))
            for k, c in enumerate(pattern)]


def test_sampler_refills_and_counts_dropped():
    s = DynamicSampler(target_groups=3, max_rounds=4)
    s.add(_groups("isis", 0))
    assert not s.ready and s.dropped == 2
    s.add(_groups("ssii", 10))
    assert s.ready
    batch, stats = s.pop_batch()
    assert [g.prompt_id for g in batch] == [0, 2, 12]
    assert stats == {"dropped_groups": 4, "rollout_rounds": 2, "carried_over": 1}
    s.add(_groups("ii", 20))  # the carried-over group 13 counts toward the next batch
    batch, stats = s.pop_batch()
    assert [g.prompt_id for g in batch] == [13, 20, 21] and stats["dropped_groups"] == 0
    assert s.dropped_total == 4


def test_sampler_gives_up_with_a_clear_error():
    s = DynamicSampler(target_groups=2, max_rounds=2)
    s.add(_groups("ss"))
    with pytest.raises(RuntimeError, match="max_rounds"):
        s.add(_groups("si"))


def test_assemble_batch_one_shot():
    batch, rest, dropped = assemble_batch(_groups("sisiii"), 2)
    assert [g.prompt_id for g in batch] == [1, 3] and [g.prompt_id for g in rest] == [4, 5] and dropped == 2
