import pytest
import torch

from engine.rl.dynamic_sampling import informative_groups, select_round

REWARDS = torch.tensor([1.0, 1.0, 1.0,  0.0, 1.0, 0.0,  0.0, 0.0, 0.0,  0.2, 0.2, 0.21])  # G=3: s, i, s, i


def test_informative_groups():
    assert informative_groups(REWARDS, 3).tolist() == [False, True, False, True]
    assert informative_groups(REWARDS, 3, atol=0.05).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="multiple of group_size"):
        informative_groups(REWARDS, 5)


def test_a_round_keeps_informative_groups_and_counts_the_dropped():
    sel = select_round(REWARDS, 3, missing=12, last_round=False)
    assert sel.keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert (sel.dropped, sel.topped_up) == (2, 0)


def test_the_last_round_tops_up_with_uninformative_groups_in_order():
    sel = select_round(REWARDS, 3, missing=9, last_round=True)  # 6 informative samples: one group short
    assert sel.keep.tolist() == [True] * 6 + [False] * 3 + [True] * 3
    assert (sel.dropped, sel.topped_up) == (1, 1)
    full = select_round(REWARDS, 3, missing=6, last_round=True)  # nothing short: no top-up
    assert full.topped_up == 0 and full.dropped == 2
    everything = select_round(REWARDS, 3, missing=100, last_round=True)
    assert bool(everything.keep.all()) and everything.topped_up == 2
