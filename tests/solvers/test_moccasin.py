"""The Moccasin CP-SAT solver: valid schedules, optimal on tiny graphs (against brute force),
clear answers for infeasible budgets, bad problems and time limits."""

import math
import random
import threading
import time

import networkx as nx
import pytest

from solvers import moccasin
from solvers.schedule import (
    ScheduleError,
    memory_profile,
    no_remat_intervals,
    peak_memory,
    random_layered_graph,
    recompute_cost,
    validate,
)


def training_chain(k: int):
    """A forward chain f0..f(k-1) and its backward b(k-1)..b0, b_i reading f_i and b_(i+1):
    the classic case where checkpointing trades memory for recomputation."""
    graph, order = nx.DiGraph(), []
    for i in range(k):
        graph.add_node(f"f{i}", mem=1, cost=1)
        order.append(f"f{i}")
        if i:
            graph.add_edge(f"f{i - 1}", f"f{i}")
    for i in reversed(range(k)):
        graph.add_node(f"b{i}", mem=1, cost=1)
        order.append(f"b{i}")
        graph.add_edge(f"f{i}", f"b{i}")
        graph.add_edge(f"b{i + 1}" if i < k - 1 else f"f{k - 1}", f"b{i}")
    return graph, order


def tiny_graph(seed: int, n: int = 5):
    rng = random.Random(seed)
    graph = nx.DiGraph()
    for v in range(n):
        graph.add_node(v, mem=rng.randint(1, 3), cost=rng.randint(1, 5))
        for u in range(v):
            if rng.random() < 0.45:
                graph.add_edge(u, v)
    return graph, list(range(n))


def brute_force(graph, order, budget, copies=2):
    """(cheapest cost within budget or None, smallest peak of any valid schedule), by
    enumerating every schedule the formulation allows, node by node in order: a second
    interval may start up to the last time anything can read the node (a user's first
    computation or, for users that may be recomputed, their own latest read: chains)."""
    position = {v: t for t, v in enumerate(order)}
    last = len(order) - 1
    may_recompute = {v: copies > 1 and graph.out_degree(v) > 0 and graph.nodes[v].get("recompute", True) for v in order}
    latest = {}
    for v in reversed(order):
        reads = [max(position[u], latest[u]) if may_recompute[u] else position[u] for u in graph.successors(v)]
        latest[v] = max(reads, default=position[v])
    options = {}
    for v in order:
        p = position[v]
        choices = []
        for e1 in range(p, last + 1):
            choices.append([(p, e1)])
            if may_recompute[v]:
                for s2 in range(e1 + 2, latest[v] + 1):
                    for e2 in range(s2, last + 1):
                        choices.append([(p, e1), (s2, e2)])
        options[v] = choices
    best = [None, None]

    def alive(chosen, u, t):
        return any(s <= t <= e for s, e in chosen[u])

    def search(k, chosen):
        if k == len(order):
            peak = max(memory_profile(graph, order, chosen))
            cost = recompute_cost(graph, chosen)
            if best[1] is None or peak < best[1]:
                best[1] = peak
            if peak <= budget and (best[0] is None or cost < best[0]):
                best[0] = cost
            return
        v = order[k]
        for spans in options[v]:
            if all(alive(chosen, u, s) for s, _ in spans for u in graph.predecessors(v)):
                chosen[v] = spans
                search(k + 1, chosen)
                del chosen[v]

    # Users come after v, so a choice for v is complete once every node is chosen; parents
    # are chosen before v, so precedence is checked as soon as v is.
    search(0, {})
    return best[0], best[1]


@pytest.mark.parametrize("seed", range(12))
def test_optimal_on_tiny_graphs_equals_brute_force(seed):
    graph, order = tiny_graph(seed)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    lowest = moccasin.lower_bound_budget(graph, order)
    for budget in range(lowest - 1, base + 1):
        cost, smallest_peak = brute_force(graph, order, budget)
        result = moccasin.solve(graph, order, budget, time_limit=10, workers=2)
        if cost is None:
            assert result.status == "infeasible", (budget, result)
            assert result.smallest_feasible_budget == smallest_peak
        else:
            assert result.status == "optimal", (budget, result)
            assert result.objective == pytest.approx(cost)
            validate(graph, order, result.intervals, budget)
            assert recompute_cost(graph, result.intervals) == pytest.approx(cost)
            assert result.peak == peak_memory(graph, order, result.intervals) <= budget


@pytest.mark.parametrize("seed", range(4))
def test_float_costs_are_proved_optimal_like_integer_ones(seed):
    # costs CP-SAT has to scale to integers (FLOP and byte counts): a proved optimum equal to
    # the phase-one schedule is still reported optimal, with the float cost of the schedule
    graph, order = tiny_graph(seed)
    for v in graph.nodes:
        graph.nodes[v]["cost"] = graph.nodes[v]["cost"] * 1.37e8 / 3
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    lowest = moccasin.lower_bound_budget(graph, order)
    for budget in range(lowest, base):
        cost, _ = brute_force(graph, order, budget)
        if cost is None:
            continue
        result = moccasin.solve(graph, order, budget, time_limit=10, workers=2)
        assert result.status == "optimal", (budget, result)
        assert result.objective == pytest.approx(cost, rel=1e-5)
        assert result.objective == recompute_cost(graph, result.intervals)
        assert result.bound == pytest.approx(result.objective, rel=1e-5)


def test_a_cost_far_below_the_largest_is_not_made_free():
    # a pointwise op over a small vector beside a large matmul (FLOPs + bytes): scaled to
    # integers it must still cost something, or the solver recomputes it for nothing
    graph = nx.DiGraph()
    graph.add_node("matmul", mem=1, cost=2.0e12)
    graph.add_node("scale", mem=1, cost=3.2e4)
    graph.add_node("unused", mem=1, cost=0.0)
    costs, scale = moccasin._integer_costs(graph)
    assert costs == {"matmul": 10**6, "scale": 1, "unused": 0}
    assert scale == pytest.approx(10**6 / 2.0e12)


def test_training_chain_trades_memory_for_recomputation():
    graph, order = training_chain(8)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    costs = []
    for budget in range(base, base - 4, -1):
        result = moccasin.solve(graph, order, budget, time_limit=10, workers=2, intervals_per_node=3)
        assert result.status == "optimal"
        validate(graph, order, result.intervals, budget)
        costs.append(result.objective)
        assert len(result.recomputations) == result.objective  # unit costs: one per recomputation
    assert costs[0] == 0 and costs == sorted(costs) and costs[-1] > 0


def test_plain_schedule_is_returned_when_it_fits():
    graph, order = training_chain(5)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    result = moccasin.solve(graph, order, base, time_limit=5, workers=1)
    assert result.status == "optimal" and result.objective == 0 and result.recomputations == []


def test_infeasible_budget_reports_the_smallest_feasible_one():
    graph, order = training_chain(6)
    lowest = moccasin.lower_bound_budget(graph, order)
    result = moccasin.solve(graph, order, lowest - 1, time_limit=10, workers=2)
    assert result.status == "infeasible" and not result.has_schedule
    smallest = result.smallest_feasible_budget
    assert smallest is not None and smallest >= lowest
    validate(graph, order, result.smallest_intervals, smallest)  # the schedule found there comes with it
    at_smallest = moccasin.solve(graph, order, smallest, time_limit=10, workers=2)
    assert at_smallest.has_schedule
    validate(graph, order, at_smallest.intervals, smallest)


def test_keep_nodes_stay_to_the_end():
    graph, order = training_chain(5)
    keep = {"f4"}
    base = peak_memory(graph, order, no_remat_intervals(graph, order, keep))
    result = moccasin.solve(graph, order, base - 1, time_limit=10, workers=2, keep=keep)
    assert result.has_schedule
    validate(graph, order, result.intervals, base - 1, keep=keep)
    assert result.intervals["f4"][0][1] == len(order) - 1


def test_schedules_on_random_layered_graphs_are_valid():
    graph, order = random_layered_graph(60, seed=3, width=5, fan_in=3, skip=0.3)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    for fraction in (0.9, 0.8):
        budget = int(base * fraction)
        result = moccasin.solve(graph, order, budget, time_limit=20, workers=2)
        if result.has_schedule:
            validate(graph, order, result.intervals, budget)
            assert result.bound <= result.objective + 1e-9
        else:
            assert result.status == "infeasible" and result.smallest_feasible_budget > budget


def test_time_limit_gives_a_valid_schedule_or_says_none_was_found():
    graph, order = random_layered_graph(300, seed=5, width=10, fan_in=4, skip=0.3)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    budget = int(base * 0.85)
    result = moccasin.solve(graph, order, budget, time_limit=0.5, workers=1, find_smallest_budget=False)
    assert result.status in ("optimal", "feasible", "unknown", "infeasible")
    if result.has_schedule:
        validate(graph, order, result.intervals, budget)


def test_validate_names_what_is_wrong():
    graph, order = training_chain(3)
    good = no_remat_intervals(graph, order)
    validate(graph, order, good)
    broken = dict(good, f0=[(0, 0)])  # f0 dropped before f1 and b0 read it
    with pytest.raises(ScheduleError, match="needs 'f0'"):
        validate(graph, order, broken)
    with pytest.raises(ScheduleError, match="exceeds the budget"):
        validate(graph, order, good, budget=1)
    with pytest.raises(ScheduleError, match="first interval must start"):
        validate(graph, order, dict(good, f1=[(2, 5)]))
    recomputed = dict(good, f0=[(0, 1), (5, 5)])  # f0 kept for f1, recomputed for b0
    validate(graph, order, recomputed)
    graph.nodes["f0"]["recompute"] = False
    with pytest.raises(ScheduleError, match="'f0' has recompute=False"):
        validate(graph, order, recomputed)


def test_bad_problems_are_refused():
    graph, order = training_chain(3)
    with pytest.raises(ScheduleError, match="not topological"):
        moccasin.solve(graph, list(reversed(order)), 10)
    with pytest.raises(ScheduleError, match="every node"):
        moccasin.solve(graph, order[:-1], 10)
    graph.nodes["f0"].pop("mem")
    with pytest.raises(ScheduleError, match="'mem'"):
        moccasin.solve(graph, order, 10)


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_greedy_start_is_valid_when_it_finds_a_schedule():
    found = 0
    for seed in range(8):
        graph, order = random_layered_graph(120, seed=seed, width=6, fan_in=3, skip=0.3)
        base = peak_memory(graph, order, no_remat_intervals(graph, order))
        for fraction in (0.95, 0.9, 0.85):
            budget = int(base * fraction)
            intervals = moccasin.greedy_schedule(graph, order, budget)
            if intervals is not None:
                found += 1
                validate(graph, order, intervals, budget)
                assert all(len(spans) <= 2 for spans in intervals.values())
    assert found >= 4  # the start is useful on these graphs, not only correct when it gives up


def chain_graph():
    """c is read again by z after a stretch (x, y) where neither c nor its input b fits: both
    are recomputed at z's time, b only because c needs it (a chain); a, read by z too, stays."""
    graph = nx.DiGraph()
    for node, mem in (("a", 1), ("b", 4), ("c", 4), ("x", 6), ("y", 6), ("z", 1)):
        graph.add_node(node, mem=mem, cost=1)
    graph.add_edges_from([("a", "b"), ("b", "c"), ("x", "y"), ("c", "z"), ("a", "z")])
    return graph, ["a", "b", "c", "x", "y", "z"]


def test_recomputation_chains_are_found():
    graph, order = chain_graph()
    assert peak_memory(graph, order, no_remat_intervals(graph, order)) == 17
    assert brute_force(graph, order, 13)[0] == 2
    result = moccasin.solve(graph, order, 13, time_limit=10, workers=2)
    assert result.status == "optimal" and result.objective == 2
    assert sorted(result.recomputations) == [(5, "b"), (5, "c")]
    validate(graph, order, result.intervals, 13)
    greedy = moccasin.greedy_schedule(graph, order, 13)
    validate(graph, order, greedy, 13)
    assert recompute_cost(graph, greedy) == 2


def mark_not_recomputable(graph, share: float, seed: int):
    rng = random.Random(seed)
    marked = {v for v in graph.nodes if rng.random() < share}
    for v in marked:
        graph.nodes[v]["recompute"] = False
    return marked


@pytest.mark.parametrize("seed", range(4))
def test_nodes_that_must_not_be_recomputed_equal_brute_force(seed):
    graph, order = tiny_graph(seed)
    marked = mark_not_recomputable(graph, 0.5, seed)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    for budget in range(moccasin.lower_bound_budget(graph, order), base + 1):
        cost, _ = brute_force(graph, order, budget)
        result = moccasin.solve(graph, order, budget, time_limit=10, workers=2, find_smallest_budget=False)
        if cost is None:
            assert result.status == "infeasible", (budget, result)
            continue
        assert result.status == "optimal" and result.objective == pytest.approx(cost), (budget, result)
        validate(graph, order, result.intervals, budget)
        assert all(len(result.intervals[v]) == 1 for v in marked)


def test_nodes_that_must_not_be_recomputed_cost_more_and_stay_single():
    graph, order = training_chain(8)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    free = moccasin.solve(graph, order, base - 3, time_limit=10, workers=2, intervals_per_node=3)
    for i in range(1, 8, 2):
        graph.nodes[f"f{i}"]["recompute"] = False
    bound = moccasin.solve(graph, order, base - 3, time_limit=10, workers=2, intervals_per_node=3)
    assert free.status == bound.status == "optimal" and bound.objective >= free.objective
    validate(graph, order, bound.intervals, base - 3)
    assert all(len(bound.intervals[f"f{i}"]) == 1 for i in range(1, 8, 2))
    for v in order:  # nothing may be recomputed: only the plain schedule is left
        graph.nodes[v]["recompute"] = False
    assert moccasin.solve(graph, order, base - 1, time_limit=10, workers=2).status == "infeasible"
    assert moccasin.greedy_schedule(graph, order, base - 1, time_limit=1) is None


@pytest.mark.parametrize("fraction", [0.9, 0.8, 0.7])
@pytest.mark.parametrize("edges", [None, 900])
def test_local_search_fits_layered_graphs_of_a_few_hundred_nodes(fraction, edges):
    graph, order = random_layered_graph(300, seed=7, width=8, fan_in=4, skip=0.3, edges=edges)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * fraction)
    intervals = moccasin.greedy_schedule(graph, order, budget, time_limit=10)
    assert intervals is not None
    validate(graph, order, intervals, budget)
    assert all(len(spans) <= 2 for spans in intervals.values())


@pytest.mark.parametrize("fraction", [0.9, 0.8])
def test_local_search_never_recomputes_what_must_not_be(fraction):
    graph, order = random_layered_graph(300, seed=7, width=8, fan_in=4, skip=0.3)
    marked = mark_not_recomputable(graph, 0.3, seed=1)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * fraction)
    intervals = moccasin.greedy_schedule(graph, order, budget, time_limit=10)
    assert intervals is not None
    validate(graph, order, intervals, budget)
    assert all(len(intervals[v]) == 1 for v in marked)


@pytest.mark.parametrize("seed", range(6))
def test_local_search_gives_a_valid_schedule_or_none(seed):
    graph, order = tiny_graph(seed, n=6)
    keep = {order[-1]}
    base = peak_memory(graph, order, no_remat_intervals(graph, order, keep))
    for budget in range(moccasin.lower_bound_budget(graph, order, keep) - 1, base + 1):
        for copies in (1, 2, 3):
            intervals = moccasin.greedy_schedule(graph, order, budget, copies, keep, time_limit=0.2)
            if intervals is None:
                continue
            validate(graph, order, intervals, budget, keep=keep)
            assert all(len(spans) <= copies for spans in intervals.values())
            assert len(intervals[order[-1]]) == 1


def _kicks_needed():
    """A graph and budget where the local search's descents at two intervals (every chain
    depth) find no schedule and its kicks find one."""
    graph, order = random_layered_graph(200, seed=8, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.6)
    return graph, order, budget


@pytest.mark.slow
def test_the_search_kicks_only_where_asked_and_no_start_fits(monkeypatch):
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)  # every depth, however loaded the machine
    graph, order, budget = _kicks_needed()
    assert moccasin.greedy_schedule(graph, order, budget, kicks=False) is None
    kicked = moccasin.greedy_schedule(graph, order, budget)
    assert kicked is not None
    validate(graph, order, kicked, budget)
    # solve's search kicks by default; told not to (a caller searched already), the first schedule
    # is CP-SAT's to find, if any
    # phase two is not what is tested: the search has most of the time
    quick = dict(time_limit=3, search_share=0.9, workers=2, stall_seconds=1.0, stall_share=0.0)
    assert moccasin.solve(graph, order, budget, **quick).start_costs.keys() == {"local search", "local search, polished"}
    told = moccasin.solve(graph, order, budget, search_kicks=False, **quick)
    assert "local search" not in told.start_costs and told.phase_one in ("cp-sat", "")
    # a start that fits: no kicks, the search's descents alone do not compete with it
    given = moccasin.solve(graph, order, budget, starts={"given": kicked}, **quick)
    assert given.start_costs.keys() == {"given"}
    assert given.objective <= given.start_costs["given"]


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_phase_one_is_hinted_into_phase_two_on_a_thousand_nodes():
    graph, order = random_layered_graph(1000, seed=1000, width=8, fan_in=4, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.8)
    result = moccasin.solve(graph, order, budget, time_limit=3, workers=2, find_smallest_budget=False)
    # phase two begins from the search's schedule; its polish, made meanwhile, may be the cheaper
    assert result.has_schedule and result.phase_one in ("local search", "local search, polished")
    assert result.start_costs["local search, polished"] <= result.start_costs["local search"]
    validate(graph, order, result.intervals, budget)
    assert result.objective == recompute_cost(graph, result.intervals) <= result.trace[0][1]


class _Progress:
    def __init__(self, best, improved):
        self.best, self.improved = best, improved


def test_early_stopping_says_why():
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    watch = moccasin._Watch(solver, _Progress(100, 0.0), 0.0, stall_seconds=2.0, stall_share=0.25, gap=0.01)
    assert watch.check(1.0) is None  # improved a second ago, no bound yet
    assert watch.check(2.5) == "stalled"  # no better schedule for max(2 s, 0.25 x 2.5 s)
    watch.progress.improved = 80.0
    assert watch.check(106.0) is None  # 26 s without one after 106 s: under a quarter of it
    assert watch.check(108.0) == "stalled"
    watch.bound = 98.0
    assert watch.check(81.0) is None  # a gap of 2%
    watch.bound = 99.5
    assert watch.check(81.0) == "gap"
    endless = moccasin._Watch(solver, _Progress(100, 0.0), 0.0, stall_seconds=None, stall_share=0.25, gap=0.0)
    endless.bound = 100
    assert endless.check(1e6) is None
    above = moccasin._Watch(solver, _Progress(120, 0.0), 0.0, None, 0.25, 0.0, bound_above=100)
    above.bound = 101
    assert above.check(1.0) == "bound"


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_early_stopping_stops_well_before_the_time_limit_and_says_why():
    graph, order = random_layered_graph(300, seed=5, width=8, fan_in=4, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.8)
    result = moccasin.solve(graph, order, budget, time_limit=60, workers=2, find_smallest_budget=False)
    assert result.has_schedule and result.stopped in ("gap", "stalled", "optimal")
    assert result.seconds < 30
    validate(graph, order, result.intervals, budget)
    if result.stopped == "gap":
        assert result.objective - result.bound <= moccasin.GAP * result.objective + 1e-9


@pytest.mark.slow
def test_early_stopping_is_within_tolerance_of_a_long_solve():
    graph, order = random_layered_graph(80, seed=2, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.75)
    long = moccasin.solve(graph, order, budget, time_limit=5, workers=2, gap=0.0, stall_seconds=None,
                          find_smallest_budget=False)  # fmt: skip
    early = moccasin.solve(graph, order, budget, time_limit=5, workers=2, find_smallest_budget=False)
    assert long.has_schedule and early.has_schedule and early.stopped
    assert long.stopped in ("optimal", "time_limit")
    assert early.objective <= long.objective * 1.05
    validate(graph, order, early.intervals, budget)


@pytest.mark.slow
def test_an_infeasible_budget_fails_in_seconds():
    # far below any schedule with one recomputation per node, though above the bound that
    # answers at once: the local search, CP-SAT lowering the peak, both stop early
    graph, order = random_layered_graph(150, seed=5, width=8, fan_in=4, skip=0.3)
    budget = moccasin.lower_bound_budget(graph, order)
    result = moccasin.solve(graph, order, budget, time_limit=60, workers=2)
    assert not result.has_schedule and result.status in ("infeasible", "unknown")
    assert result.seconds < 25
    assert result.smallest_feasible_budget is None or result.smallest_feasible_budget > budget


def test_a_start_that_fits_begins_phase_two_and_bad_ones_are_ignored():
    graph, order = training_chain(8)
    base = peak_memory(graph, order, no_remat_intervals(graph, order))
    optimum = moccasin.solve(graph, order, base - 3, time_limit=10, workers=2, intervals_per_node=3)
    over = no_remat_intervals(graph, order)  # valid, but over the budget
    too_many = {v: [(s, s) for s in range(order.index(v), len(order), 2)] for v in order}
    starts = {"given": optimum.intervals, "over the budget": over, "broken": too_many, "not a schedule": {"f0": []}}
    result = moccasin.solve(graph, order, base - 3, time_limit=10, workers=2, intervals_per_node=3, starts=starts)
    assert set(result.start_costs) <= {"given", "local search", "local search, polished"} and "given" in result.start_costs
    assert result.objective == optimum.objective
    assert result.phase_one == min(result.start_costs, key=result.start_costs.get)


def test_the_search_is_not_run_again_for_a_callers_schedule_unless_none_fits(monkeypatch):
    graph, order = training_chain(8)
    budget = peak_memory(graph, order, no_remat_intervals(graph, order)) - 3
    searches = []
    search = moccasin._search
    monkeypatch.setattr(moccasin, "_search", lambda *a, **k: searches.append(a[3]) or search(*a, **k))
    found = moccasin.greedy_schedule(graph, order, budget, 3)
    assert found is not None and searches == [3]
    quick = dict(intervals_per_node=3, time_limit=10, workers=2)
    given = moccasin.solve(graph, order, budget, starts={"local search": found}, local_search=False, **quick)
    assert searches == [3] and given.start_costs.keys() == {"local search"}
    assert given.objective == moccasin.solve(graph, order, budget, **quick).objective
    assert searches == [3, 3]
    # the caller's schedule does not fit this budget: the search runs after all
    tighter = moccasin.solve(graph, order, budget - 1, starts={"local search": found}, local_search=False, **quick)
    assert searches == [3, 3, 3] and tighter.has_schedule


def test_where_nothing_else_helps_a_chain_is_recomputed_where_there_is_room(monkeypatch):
    # the descents alone: recomputing a tensor and its missing inputs all at its read leaves this
    # budget out of reach; recomputed at the time in between with the least memory and kept to
    # the read, it fits
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)
    graph, order = random_layered_graph(40, seed=10, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.7)
    found = moccasin.greedy_schedule(graph, order, budget, 2, kicks=False)
    assert found is not None
    validate(graph, order, found, budget)
    monkeypatch.setattr(moccasin._Repair, "_early_time", lambda self, *args: None)
    assert moccasin.greedy_schedule(graph, order, budget, 2, kicks=False) is None


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_a_search_that_found_no_schedule_says_whether_time_or_the_stall_rule_ended_it():
    graph, order = random_layered_graph(200, seed=8, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.3)
    common = dict(workers=2, find_smallest_budget=False, search_kicks=False)
    timed_out = moccasin.solve(graph, order, budget, time_limit=1.0, stall_seconds=None, **common)
    assert not timed_out.has_schedule and timed_out.stopped == "time_limit"
    stalled = moccasin.solve(graph, order, budget, time_limit=30, stall_seconds=0.5, stall_share=0.0, **common)
    assert not stalled.has_schedule and stalled.stopped == "stalled" and stalled.seconds < 20


@pytest.mark.parametrize("seed", range(6))
def test_the_polish_keeps_a_valid_schedule_and_never_costs_more(monkeypatch, seed):
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)
    monkeypatch.setattr(moccasin, "POLISH_SECONDS", math.inf)
    graph, order = random_layered_graph(60, seed=seed, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.7)
    polished = moccasin._search(graph, order, budget, 3, set(), 30.0, 0, kicks=False)
    monkeypatch.setattr(moccasin, "POLISH_PATIENCE", 0)
    plain = moccasin._search(graph, order, budget, 3, set(), 30.0, 0, kicks=False)
    assert plain.fits() == polished.fits()
    if polished.fits():
        validate(graph, order, polished.intervals(), budget)
        assert polished.total_cost() <= plain.total_cost()
        assert polished.total_cost() == recompute_cost(graph, polished.intervals())


def test_the_polish_finds_a_cheaper_stand_in_for_a_dear_recomputation(monkeypatch):
    # the descents stop at the first schedule that fits (44); dropping its dearest
    # recomputations and repairing from there finds one of 31
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)
    monkeypatch.setattr(moccasin, "POLISH_SECONDS", math.inf)
    graph, order = random_layered_graph(60, seed=8, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.7)
    polished = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)
    monkeypatch.setattr(moccasin, "POLISH_PATIENCE", 0)
    plain = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)
    validate(graph, order, polished, budget)
    assert recompute_cost(graph, plain) == 44 and recompute_cost(graph, polished) == 31


def test_late_starts_are_made_while_phase_two_runs_and_the_cheaper_taken(monkeypatch):
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)
    monkeypatch.setattr(moccasin, "POLISH_SECONDS", math.inf)
    graph, order = random_layered_graph(60, seed=8, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.7)
    polished = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)  # 31
    monkeypatch.setattr(moccasin, "POLISH_PATIENCE", 0)
    plain = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)  # 44
    seen = []

    def late():
        seen.append([t.name for t in threading.enumerate()])  # phase two runs meanwhile
        return {"min-cut": polished, "over the budget": no_remat_intervals(graph, order)}

    # phase two begins from the dearer schedule and, in this little time, does not reach the late one
    result = moccasin.solve(graph, order, budget, intervals_per_node=3, time_limit=0.2, workers=2,
                            starts={"given": plain}, local_search=False, late_starts=late)  # fmt: skip
    assert len(seen) == 1 and "cp-sat phase two" in seen[0]
    assert result.start_costs == {"given": 44, "min-cut": 31}
    assert result.phase_one == "min-cut" and result.objective == 31 == result.trace[-1][1]
    assert result.intervals == polished


def test_late_starts_come_first_where_no_start_fits_and_their_errors_stop_the_search(monkeypatch):
    graph, order = training_chain(8)
    budget = peak_memory(graph, order, no_remat_intervals(graph, order)) - 3
    quick = dict(intervals_per_node=3, time_limit=10, workers=2, local_search=False)
    found = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)
    with monkeypatch.context() as patch:  # a search that finds nothing: the late starts are all there is
        patch.setattr(moccasin, "_search", lambda graph, order, budget, intervals, keep, *rest, **kw:
                      moccasin._Repair(graph, order, budget, intervals, keep))  # fmt: skip
        result = moccasin.solve(graph, order, budget, late_starts=lambda: {"min-cut": found}, **quick)
    assert result.has_schedule and result.phase_one == "min-cut" and result.start_costs.keys() == {"min-cut"}

    def broken():
        raise RuntimeError("min-cut failed")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="min-cut failed"):
        moccasin.solve(graph, order, budget, starts={"given": found}, late_starts=broken, **quick)
    assert threading.active_count() == before  # the search was stopped and its thread joined


def test_lowering_the_peak_is_hinted_completely_so_the_hint_is_its_first_solution():
    # the capacity is hinted with the schedule's peak (raised to the model's least): with every
    # variable fixed to its hint the model is solved at once, at that peak; a hint without the
    # capacity's (once 0: a proto's repeated field has no index -1) left CP-SAT to repair it
    graph, order = random_layered_graph(120, seed=3, width=6, fan_in=3, skip=0.3)
    plain = peak_memory(graph, order, no_remat_intervals(graph, order))
    for budget in (int(plain * 0.8), 0):
        closest = moccasin._search(graph, order, int(plain * 0.8), 2, set(), 10, 0, kicks=False, polish=False)
        model = moccasin._Model(graph, order, budget, 2, set(), minimize_budget=True)
        model.hint(closest.intervals())
        hinted = dict(zip(model.model.proto.solution_hint.vars, model.model.proto.solution_hint.values))
        unhinted = [v.name for i, v in enumerate(model.model.proto.variables) if i not in hinted and len(set(v.domain)) > 1]
        assert not unhinted
        solver = moccasin._solver(10, 1, 0)
        solver.parameters.fix_variables_to_their_hinted_value = True
        assert solver.solve(model.model) == moccasin.cp_model.OPTIMAL
        assert solver.value(model.capacity) == max(peak_memory(graph, order, closest.intervals()), budget)



@pytest.mark.parametrize("start, fits", [(300, True), (20000, False)])
def test_kicks_stop_where_their_pace_would_not_reach_the_budget_in_time(monkeypatch, start, fits):
    # kicks that each lower the overflow by 1 in 2 ms: 1% of it in every stall window, so only
    # their pace (about 500 a second, 5 s left) tells 20000 from 300
    graph, order = training_chain(4)
    search = moccasin._Repair(graph, order, 3, 2, set())
    left = {"overflow": start}
    monkeypatch.setattr(search, "overflow", lambda: left["overflow"])
    monkeypatch.setattr(search, "_descend", lambda deadline: left["overflow"] == 0)

    def kick():
        time.sleep(0.002)
        left["overflow"] -= 1

    monkeypatch.setattr(search, "_kick", kick)
    began = time.perf_counter()
    search.run(5.0, kicks=True, stall=(0.5, 0.0, began))
    took = time.perf_counter() - began
    if fits:
        assert left["overflow"] == 0
    else:
        assert left["overflow"] > 0 and took < 2.0


def test_a_schedule_found_beside_the_search_sets_what_counts_as_its_progress(monkeypatch):
    class Scripted(moccasin._Progress):
        value = 0

        @property
        def objective_value(self):
            return self.value

    progress = Scripted(0.0, 1.0, best=100)
    progress.value = 90
    progress.on_solution_callback()
    first = progress.improved
    progress.rival(50)
    time.sleep(0.01)
    progress.value = 80  # better than the search's own, not than the rival: no progress
    progress.on_solution_callback()
    assert progress.improved == first and progress.best == 50
    progress.value = 40
    progress.on_solution_callback()
    assert progress.improved > first and progress.best == 40
    progress.rival(None)
    progress.rival(60)
    assert progress.best == 40

    # solve names the late start's cost (CP-SAT's integer units) as the rival
    graph, order = random_layered_graph(60, seed=8, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * 0.7)
    found = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False)
    given = moccasin.greedy_schedule(graph, order, budget, 3, kicks=False, polish=False)
    rivals = []
    monkeypatch.setattr(moccasin._Progress, "rival", lambda self, value: rivals.append(value))
    moccasin.solve(graph, order, budget, intervals_per_node=3, time_limit=0.5, workers=2, local_search=False,
                   starts={"given": given}, late_starts=lambda: {"min-cut": found,
                   "over the budget": no_remat_intervals(graph, order)})  # fmt: skip
    costs, scale = moccasin._integer_costs(graph)
    assert rivals == [sum(costs[v] * (len(spans) - 1) for v, spans in found.items())]
