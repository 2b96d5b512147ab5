"""remat's intervals=0 probe (passes/remat/plan.py ``_auto_order``): the local search's
descents at the most intervals, then its kicks, decide which setting is solved first (the
fewest its schedule can start); the schedule it found starts that solve, and kicks that found
nothing are not repeated. Where that solve proves its optimum, one more interval is tried
(``Planner._one_more``)."""

import math
import types

import pytest

from passes.remat import plan
from solvers import moccasin
from solvers.schedule import no_remat_intervals, peak_memory, random_layered_graph, validate


@pytest.fixture(autouse=True)
def _every_depth(monkeypatch):
    """The search tries every chain depth, however loaded the machine: the same answers each run."""
    monkeypatch.setattr(moccasin, "DEEPER_SECONDS", math.inf)


def _problem(fraction: float, nodes: int = 120, seed: int = 4):
    graph, order = random_layered_graph(nodes, seed=seed, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * fraction)
    return graph, types.SimpleNamespace(order=order, keep=set()), budget


@pytest.mark.parametrize("fraction", [0.9, 0.7])
def test_the_fewest_intervals_the_searchs_schedule_can_be_solved_with_come_first(fraction):
    graph, model, budget = _problem(fraction)
    most = max(plan.AUTO_INTERVALS)
    searched = moccasin.greedy_schedule(graph, model.order, budget, most, kicks=False, polish=False)
    assert searched is not None, "the descents meet this budget"
    settings, found, kicked = plan._auto_order(graph, model, budget)
    assert found == searched and not kicked and sorted(settings) == sorted(plan.AUTO_INTERVALS)
    used = max(len(spans) for spans in found.values())
    validate(graph, model.order, found, budget)
    # the first setting solves it; none fewer could (each allows at most that many intervals)
    assert used <= settings[0] and moccasin.usable_start(graph, model.order, found, budget, settings[0])
    assert not any(moccasin.usable_start(graph, model.order, found, budget, i) for i in plan.AUTO_INTERVALS if i < settings[0])


def test_a_schedule_with_one_recomputation_per_tensor_starts_the_fewest_intervals():
    graph, model, budget = _problem(0.9)
    most = max(plan.AUTO_INTERVALS)
    searched = moccasin.greedy_schedule(graph, model.order, budget, most, kicks=False, polish=False)
    assert max(len(spans) for spans in searched.values()) == 2, "this budget needs one recomputation at most"
    assert plan._auto_order(graph, model, budget)[0][0] == min(plan.AUTO_INTERVALS)


def test_kicks_at_the_most_intervals_where_no_descent_fits(monkeypatch):
    monkeypatch.setattr(plan, "AUTO_INTERVALS", (2,))  # a graph whose descents fail at 2 and kicks do not
    monkeypatch.setattr(plan, "_PROBE_SECONDS", 30.0)  # a loaded machine's descents leave the kicks their time
    graph, model, budget = _problem(0.6, nodes=200, seed=8)
    assert all(moccasin.greedy_schedule(graph, model.order, budget, i, kicks=False) is None for i in plan.AUTO_INTERVALS)
    searches, search = [], moccasin._search
    monkeypatch.setattr(moccasin, "_search", lambda *args, **kwargs: searches.append(args) or search(*args, **kwargs))
    settings, found, kicked = plan._auto_order(graph, model, budget)
    most = max(plan.AUTO_INTERVALS)
    assert settings[0] == most and found is not None and not kicked
    assert len(searches) == 1  # the kicks go on from the descents: they are not run twice
    validate(graph, model.order, found, budget)


def test_a_budget_the_search_cannot_meet_is_solved_with_the_most_intervals_alone():
    graph, model, budget = _problem(0.3, nodes=60)
    assert plan._auto_order(graph, model, budget) == ((max(plan.AUTO_INTERVALS),), None, True)


def test_the_plain_step_fitting_needs_no_search():
    graph, model, _ = _problem(1.0)
    plain = peak_memory(graph, model.order, no_remat_intervals(graph, model.order))
    assert plan._auto_order(graph, model, plain) == (plan.AUTO_INTERVALS, None, False)


def test_where_the_search_found_nothing_one_solve_with_the_most_intervals(monkeypatch):
    # the most intervals allow every schedule fewer do: a budget none meets fails once, not per setting
    import torch

    from passes import Remat
    from rewrite import optimize

    solved = []
    solve = plan.Planner._solve

    def recorded(self, graph, model, target, intervals, probe=None, searched=False, *rest, **kwargs):
        solved.append((intervals, searched))
        return solve(self, graph, model, target, intervals, probe, searched, *rest, **kwargs)

    monkeypatch.setattr(plan, "_auto_order", lambda *args: ((max(plan.AUTO_INTERVALS),), None, True))
    monkeypatch.setattr(plan.Planner, "_solve", recorded)
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(4)))
    module = optimize(model, [Remat(budget=0.6, time_limit=10, workers=2, cache=False)], (torch.randn(64, 32),), verify=False)
    most = max(plan.AUTO_INTERVALS)
    assert solved == [(most, True)] and module.report["remat"].figures["intervals"] == most


def _scripted_planner(monkeypatch, answer, peak=100):
    """A planner whose solves return ``answer`` (recorded), its written-out steps peaking at ``peak``."""
    from passes import Remat

    calls = []

    def solve(self, graph, model, target, intervals, probe=None, searched=False, start="local search", stall_seconds=None):
        calls.append(dict(intervals=intervals, probe=probe, searched=searched, start=start, stall_seconds=stall_seconds))
        return answer

    monkeypatch.setattr(plan.Planner, "_solve", solve)
    monkeypatch.setattr(plan, "realize", lambda model, intervals: (None, None))
    monkeypatch.setattr(plan, "activation_profile", lambda graph: [peak])
    return plan.Planner(Remat(budget=0.5, cache=False)), calls


def _found(objective, status="optimal", intervals_per_node=2, seconds=1.0, plan_cache="off"):
    from solvers.schedule import Schedule

    return Schedule(status, objective, intervals={"a": [(0, 1)]}, seconds=seconds, intervals_per_node=intervals_per_node,
                    plan_cache=plan_cache)  # fmt: skip


def test_a_proved_optimum_is_solved_again_with_one_interval_more_and_the_cheaper_taken(monkeypatch):
    planner, calls = _scripted_planner(monkeypatch, _found(8.0, "feasible", None, seconds=2.0))
    first = _found(10.0)
    schedule, realized = planner._one_more(None, None, 150, first, 120)
    assert calls == [dict(intervals=3, probe=first.intervals, searched=True, start="cp-sat at 2 intervals",
                          stall_seconds=plan._ONE_MORE_STALL_SECONDS)]  # fmt: skip
    assert schedule.objective == 8.0 and schedule.intervals_per_node == 3 and schedule.seconds == 3.0 and realized == 100


@pytest.mark.parametrize(
    "first, again, peak",
    [
        (_found(10.0), _found(10.0, "feasible", None), 100),  # no cheaper
        (_found(10.0), _found(8.0, "feasible", None), 200),  # cheaper, but over the budget written out
        (_found(10.0), _found(None, "unknown", None), 100),  # none found
    ],
)
def test_one_interval_more_is_kept_only_where_cheaper_and_within_the_budget(monkeypatch, first, again, peak):
    planner, calls = _scripted_planner(monkeypatch, again, peak)
    assert planner._one_more(None, None, 150, first, 120) == (first, 120) and len(calls) == 1


@pytest.mark.parametrize(
    "first",
    [
        _found(10.0, "feasible"),  # not proved: the intervals may not be what binds
        _found(10.0, plan_cache="hit"),  # the cache holds the better of the two
        _found(10.0, intervals_per_node=max(plan.AUTO_INTERVALS)),  # no setting beyond
    ],
)
def test_one_interval_more_is_not_tried_unless_a_fresh_solve_proved_its_optimum(monkeypatch, first):
    planner, calls = _scripted_planner(monkeypatch, _found(1.0))
    assert planner._one_more(None, None, 150, first, 120) == (first, 120) and calls == []
