import pytest

from engine.rl.iterative_sft import plan_iterations, select_iteration, tau_for_iteration, wrong_sample_ids

# 8 samples with reward-model scores 0-5
SCORES = {"s0": 0, "s1": 1, "s2": 2, "s3": 3, "s4": 4, "s5": 5, "s6": 5, "s7": 2.5}


def test_tau_schedule():
    assert [tau_for_iteration([2, 3, 4, 5], t) for t in (1, 2, 3, 4)] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="outside the τ schedule"):
        tau_for_iteration([2, 3, 4, 5], 5)


def test_selection_is_union_of_rm_and_previous_errors():
    # t = 3: τ = 4 -> D_rm = {s4, s5, s6}; E_2 = {s0, s5} -> union = {s4, s5, s6, s0}
    sel = select_iteration(SCORES, {"s0", "s5"}, tau=4)
    assert set(sel.ids) == {"s0", "s4", "s5", "s6"} and len(sel.ids) == 4
    assert (sel.num_rm, sel.num_wrong, sel.num_overlap, sel.num_total, sel.num_pool) == (3, 2, 1, 4, 8)
    assert sel.ids[:3] == ["s4", "s5", "s6"]  # D_rm first, in table order, then the extra wrong ones


def test_plan_over_all_iterations_with_wrong_ids_from_correctness():
    ids = list(SCORES)
    # M_t answers more samples right each iteration; E_t = the ones it got wrong
    correct_by_model = {
        0: [0, 0, 1, 1, 1, 1, 1, 0],
        1: [0, 1, 1, 1, 1, 1, 1, 1],
        2: [1, 1, 1, 1, 1, 1, 0, 1],
        3: [1, 1, 1, 1, 1, 1, 1, 1],
    }
    plans = plan_iterations(SCORES, [2, 3, 4, 5], lambda t: wrong_sample_ids(ids, correct_by_model[t]))
    got = [sorted(p.ids) for p in plans]
    assert got == [
        sorted({"s2", "s3", "s4", "s5", "s6", "s7"} | {"s0", "s1"}),    # τ=2 ∪ E_0 = {s0, s1, s7}
        sorted({"s3", "s4", "s5", "s6"} | {"s0"}),                      # τ=3 ∪ E_1
        sorted({"s4", "s5", "s6"}),                                     # τ=4 ∪ E_2 = {s6} (already in)
        sorted({"s5", "s6"}),                                           # τ=5 ∪ E_3 = ∅
    ]
    assert [p.num_total for p in plans] == [8, 5, 3, 2]


def test_unknown_wrong_ids_are_an_error():
    with pytest.raises(ValueError, match="not in the scored pool"):
        select_iteration(SCORES, {"zz"}, tau=3)
    with pytest.raises(ValueError, match="correctness"):
        wrong_sample_ids(["a"], [1, 0])
