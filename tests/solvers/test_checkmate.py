"""The Checkmate MILP baseline: valid stage schedules within the budget, the same optimum as
Moccasin where both apply, and never worse than it (it may recompute any number of times and
frees memory within a stage)."""

import pytest
from test_moccasin import brute_force, tiny_graph, training_chain

from solvers import checkmate, moccasin
from solvers.schedule import ScheduleError, no_remat_intervals, peak_memory


def test_training_chain_matches_moccasin_where_both_fit():
    graph, order = training_chain(6)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    for budget in range(base, base - 3, -1):
        milp = checkmate.solve(graph, order, budget, time_limit=30)
        cp = moccasin.solve(graph, order, budget, time_limit=30, workers=2, intervals_per_node=3)
        assert milp.status == "optimal" and cp.status == "optimal"
        assert milp.objective == pytest.approx(cp.objective)
        profile = checkmate.stage_memory(graph, order, milp.compute, milp.keep)
        assert max(profile) == milp.peak <= budget


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_the_interval_optimum(seed):
    graph, order = tiny_graph(seed)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    for budget in range(moccasin.lower_bound_budget(graph, order), base + 1):
        interval_cost, _ = brute_force(graph, order, budget)
        milp = checkmate.solve(graph, order, budget, time_limit=30)
        if interval_cost is not None:
            assert milp.status == "optimal"
            assert milp.objective <= interval_cost + 1e-6
        if milp.has_schedule:
            assert max(checkmate.stage_memory(graph, order, milp.compute, milp.keep)) <= budget
            assert milp.bound <= milp.objective + 1e-6


def test_infeasible_budget_is_reported():
    graph, order = training_chain(4)
    result = checkmate.solve(graph, order, 1, time_limit=10)  # a node and its input need 2
    assert result.status == "infeasible" and not result.has_schedule


def test_stage_memory_names_a_missing_input():
    graph, order = training_chain(2)  # f0 f1 b1 b0
    compute = [["f0"], ["f1"], ["b1"], ["b0"]]
    keep = [[], ["f0"], ["f0", "f1"], ["b1"]]  # f0 dropped before b0 needs it
    with pytest.raises(ScheduleError, match="needs 'f0'"):
        checkmate.stage_memory(graph, order, compute, keep)


def test_nodes_that_must_not_be_recomputed_are_computed_in_their_own_stage_only():
    graph, order = training_chain(5)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    marked = {"f1", "f3"}
    for v in marked:
        graph.nodes[v]["recompute"] = False
    for budget in range(base, base - 3, -1):
        milp = checkmate.solve(graph, order, budget, time_limit=30)
        cp = moccasin.solve(graph, order, budget, time_limit=30, workers=2, intervals_per_node=3)
        assert milp.status == cp.status == "optimal"
        assert not marked & {v for stage in milp.compute for v in stage[:-1]}
        assert milp.objective <= cp.objective + 1e-6
        assert max(checkmate.stage_memory(graph, order, milp.compute, milp.keep)) <= budget


def test_stage_memory_names_a_node_recomputed_against_its_mark():
    graph, order = training_chain(2)  # f0 f1 b1 b0
    compute = [["f0"], ["f1"], ["b1"], ["f0", "b0"]]  # f0 dropped after f1, recomputed for b0
    keep = [[], ["f0"], ["f1"], ["b1"]]
    checkmate.stage_memory(graph, order, compute, keep)
    graph.nodes["f0"]["recompute"] = False
    with pytest.raises(ScheduleError, match="'f0' has recompute=False"):
        checkmate.stage_memory(graph, order, compute, keep)
