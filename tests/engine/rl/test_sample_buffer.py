import pytest
import torch

from engine.rl.sample_buffer import PromptPoolFilter, SelectiveSampleBuffer, effective_sample_ratio


def test_effective_sample_ratio():
    assert effective_sample_ratio(torch.tensor([0.0, 1.0, -0.5, 0.0])) == 0.5
    assert effective_sample_ratio(torch.tensor([])) == 0.0


def test_add_keeps_only_nonzero_advantage_and_evicts_oldest():
    buf = SelectiveSampleBuffer(capacity=3, max_age=10)
    assert buf.add(["a", "b", "c"], torch.tensor([0.0, 1.0, -2.0]), step=0) == 2
    buf.add(["d", "e"], torch.tensor([0.5, 0.7]), step=1)
    assert [e.sample_id for e in buf.entries] == ["c", "d", "e"]  # "b" (oldest) evicted
    buf.add(["c"], torch.tensor([3.0]), step=2)  # same id: replaced, moved to newest
    assert [(e.sample_id, e.advantage, e.step) for e in buf.entries][-1] == ("c", 3.0, 2)
    assert len(buf) == 3


def test_max_age_expiry():
    buf = SelectiveSampleBuffer(capacity=10, max_age=2)
    buf.add(["old"], torch.tensor([1.0]), step=0)
    buf.add(["new"], torch.tensor([1.0]), step=2)
    assert [s.sample_id for s in buf.draw(5, step=2)] and len(buf) == 2
    assert [s.sample_id for s in buf.draw(5, step=3)] == ["new"]  # "old" is 3 steps old > max_age


def test_draw_frequencies_are_proportional_to_abs_advantage():
    buf = SelectiveSampleBuffer(capacity=10, max_age=100, seed=7)
    buf.add([0, 1, 2, 3], torch.tensor([1.0, -2.0, 3.0, 0.0]), step=0)  # id 3 is never stored
    assert buf.probabilities().tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    n = 6000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[buf.draw(1, step=0)[0].sample_id] += 1
    freq = counts / n
    # binomial std at p=0.5, n=6000 is 0.0065: 0.03 is > 4 sigma
    assert freq.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)


def test_draw_is_without_replacement_and_consume_removes():
    buf = SelectiveSampleBuffer(capacity=10, max_age=100)
    buf.add(list("abcd"), torch.tensor([1.0, 1.0, 1.0, 1.0]), step=0)
    drawn = buf.draw(4, step=0)
    assert sorted(s.sample_id for s in drawn) == list("abcd")
    taken = buf.draw(2, step=0, consume=True)
    assert len(buf) == 2 and not ({s.sample_id for s in taken} & {e.sample_id for e in buf.entries})


def test_mix_replaces_zero_advantage_slots_and_reports_ratios():
    buf = SelectiveSampleBuffer(capacity=10, max_age=5, seed=0)
    buf.add(["x", "y"], torch.tensor([1.0, 2.0]), step=0, payloads=[{"t": 1}, {"t": 2}])
    fresh = torch.tensor([0.0, 0.5, 0.0, 0.0, -0.5, 0.0])  # 2/6 effective
    plan = buf.mix(fresh, step=1)
    assert plan.ratio_without_buffer == pytest.approx(2 / 6)
    assert len(plan.buffered) == 2 and {b.payload["t"] for b in plan.buffered} == {1, 2}
    assert len(plan.keep_fresh) + len(plan.buffered) == 6  # batch size unchanged
    assert {1, 4} <= set(plan.keep_fresh.tolist())       # effective fresh samples always kept
    assert plan.ratio_with_buffer == pytest.approx(4 / 6)
    capped = buf.mix(fresh, step=1, max_fraction=1 / 6)
    assert len(capped.buffered) == 1 and capped.ratio_with_buffer == pytest.approx(3 / 6)


def test_state_dict_round_trip_reproduces_draws():
    a = SelectiveSampleBuffer(capacity=8, max_age=100, seed=3)
    a.add(list(range(6)), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), step=0)
    a.draw(2, step=0)
    state = a.state_dict()
    b = SelectiveSampleBuffer(capacity=8, max_age=100, seed=999)
    b.load_state_dict(state)
    assert [s.sample_id for s in a.draw(3, step=1)] == [s.sample_id for s in b.draw(3, step=1)]
    with pytest.raises(ValueError, match="capacity"):
        SelectiveSampleBuffer(capacity=4, max_age=100).load_state_dict(state)


def test_offline_prompt_filter():
    f = PromptPoolFilter(window=2)
    f.record("p1", torch.tensor([0.0, 0.0]))
    f.record("p1", torch.tensor([0.0, 0.0]))      # two zero-advantage groups in a row: exhausted
    f.record("p2", torch.tensor([0.0, 0.0]))      # only one so far
    f.record("p3", torch.tensor([0.0, 0.0]))
    f.record("p3", torch.tensor([1.0, -1.0]))     # latest group informative
    kept, dropped = f.filter(["p1", "p2", "p3", "p4"])
    assert kept == ["p2", "p3", "p4"] and dropped == ["p1"]
    g = PromptPoolFilter(window=1)
    g.load_state_dict(f.state_dict())
    assert g.filter(["p1", "p2"]) == (["p2"], ["p1"])
