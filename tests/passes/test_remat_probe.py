"""remat's intervals=0 probe (passes/remat/plan.py ``_auto_order``): the local search's
descents at each setting, then its kicks at the most intervals, decide which setting is solved
first; the schedule it found starts that solve, and kicks that found nothing are not repeated."""

import types

from passes.remat import plan
from solvers.schedule import no_remat_intervals, peak_memory, random_layered_graph, validate


def _problem(fraction: float):
    graph, order = random_layered_graph(120, seed=4, width=6, fan_in=3, skip=0.3)
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * fraction)
    return graph, types.SimpleNamespace(order=order, keep=set()), budget


def test_the_fewest_intervals_the_search_fits_with_come_first():
    graph, model, budget = _problem(0.9)  # the descents fit at two intervals
    settings, found, kicked = plan._auto_order(graph, model, budget)
    assert settings == plan.AUTO_INTERVALS and list(found) == [2] and not kicked
    validate(graph, model.order, found[2], budget)
    graph, model, budget = _problem(0.7)  # at two they do not, at three they do
    settings, found, kicked = plan._auto_order(graph, model, budget)
    assert settings[0] == 3 and sorted(settings) == sorted(plan.AUTO_INTERVALS) and list(found) == [3]
    validate(graph, model.order, found[3], budget)
    assert max(len(spans) for spans in found[3].values()) <= 3


def test_a_budget_the_search_cannot_meet_leaves_the_order_and_says_it_kicked():
    graph, model, budget = _problem(0.3)
    assert plan._auto_order(graph, model, budget) == (plan.AUTO_INTERVALS, {}, True)


def test_the_plain_step_fitting_needs_no_search():
    graph, model, _ = _problem(1.0)
    plain = peak_memory(graph, model.order, no_remat_intervals(graph, model.order))
    assert plan._auto_order(graph, model, plain) == (plan.AUTO_INTERVALS, {}, False)
