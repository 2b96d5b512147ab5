"""Rematerialization with CP-SAT in the Moccasin formulation (Bartan et al., ICML 2023).

Over a fixed topological order, each node v gets C retention intervals (``intervals_per_node``):
the first is always present and starts at v's position; the others are optional, each a
recomputation of v at its start. Variables are O(C n) integers and booleans, against the
O(n^2) booleans of Checkmate's MILP. A node with ``recompute=False`` (or one that must stay to
the end, or that nothing reads) gets its first interval only.

- memory: one cumulative constraint over the present intervals, demand ``mem``, capacity the
  budget;
- precedence: for every edge (u, v) and every present interval of v, some present interval
  of u covers the interval's start (v's inputs are alive when v is computed);
- symmetry: interval i present implies interval i-1 present, and intervals are ordered;
- domains: a recomputation starts no later than the last time anything can read the node
  (its users' first computations or, recursively, their own latest recomputations), so a
  chain of recomputations at one time is allowed and nothing useless is searched;
- objective: the total ``cost`` of the present optional intervals.

Solved in two phases as in the paper: first any schedule within the budget, then the minimum
cost with that schedule as a hint. Phase one takes the schedule without recomputation when it
fits; else a local search (``greedy_schedule``, ``_Repair``) that repairs the memory profile
of the plain schedule move by move, each move recomputing a tensor at a later time (its
inputs supplied there by keeping them longer or by recomputing them too, a chain), chosen by
overflow removed per unit of recomputation cost, with random kicks when it is stuck; else
CP-SAT minimising the peak from the search's closest schedule, stopped once the peak is
within the budget. CP-SAT alone takes minutes to find a first schedule on a thousand nodes,
and improves a hint there only slowly; the local search takes well under a second on most
such graphs. Schedules found elsewhere (``starts``: PyTorch's min-cut partition,
checkpointing every block) compete with the local search's; phase two begins from the
cheapest.

Both phases stop early (``_Watch``, a thread beside CP-SAT): phase two once its cost is within
``gap`` of the proved bound or it has found nothing better for a while (``stall_seconds``,
``stall_share`` of the time so far), phase one when it stops closing in on the budget, so an
infeasible budget fails in seconds and most solves end well before ``time_limit``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable
import math
import random
import threading
import time

import networkx as nx
import numpy as np
from ortools.sat.python import cp_model

from solvers.schedule import (
    Schedule,
    ScheduleError,
    check_problem,
    no_remat_intervals,
    peak_memory,
    recomputable,
    recompute_cost,
    validate,
)

_STATUS = {
    cp_model.OPTIMAL: "optimal",
    cp_model.FEASIBLE: "feasible",
    cp_model.INFEASIBLE: "infeasible",
    cp_model.UNKNOWN: "unknown",
    cp_model.MODEL_INVALID: "invalid",
}


def _integer_costs(graph: nx.DiGraph) -> tuple[dict, float]:
    """CP-SAT needs integers: costs scaled so the largest is about 1e6 (ratios kept). A cost
    above 0 stays at least 1: one rounded to 0 would make a recomputation free to the solver."""
    costs = {node: float(data["cost"]) for node, data in graph.nodes(data=True)}
    largest = max(costs.values(), default=0.0)
    if largest == 0 or all(float(c).is_integer() and c <= 10**6 for c in costs.values()):
        return {n: int(c) for n, c in costs.items()}, 1.0
    scale = 10**6 / largest
    return {n: max(1, int(round(c * scale))) if c > 0 else 0 for n, c in costs.items()}, scale


def interval_counts(graph: nx.DiGraph, order: list, intervals_per_node: int, keep=()) -> dict:
    """How many intervals each node may have: one for nodes that are never recomputed (their
    ``recompute`` is False, they stay to the end, or nothing reads them)."""
    return {
        node: intervals_per_node if graph.out_degree(node) and node not in keep and recomputable(graph, node) else 1
        for node in order
    }


def latest_reads(graph: nx.DiGraph, order: list, counts: dict) -> dict:
    """The last time anything can read each node: its users' positions or, for users that may
    be recomputed, their own latest reads (a recomputation later than that serves nothing)."""
    position = {node: t for t, node in enumerate(order)}
    latest = {}
    for node in reversed(order):
        latest[node] = max(
            (max(position[u], latest[u]) if counts[u] > 1 else position[u] for u in graph.successors(node)),
            default=position[node],
        )
    return latest


class _Model:
    """The CP-SAT model for one problem; ``capacity`` is the budget, or a variable in
    [``budget``, total memory] minimised when ``minimize_budget`` (then ``budget`` may be 0)."""

    def __init__(self, graph, order, budget, intervals_per_node, keep, minimize_budget=False):
        self.graph, self.order = graph, order
        self.position = position = {node: t for t, node in enumerate(order)}
        last = len(order) - 1
        model = self.model = cp_model.CpModel()
        self.costs, self.scale = _integer_costs(graph)
        self.copies = interval_counts(graph, order, intervals_per_node, keep)
        latest = latest_reads(graph, order, self.copies)
        self.starts, self.ends, self.present, self.sizes = {}, {}, {}, {}
        intervals, demands = [], []
        for node in order:
            pos = position[node]
            for i in range(self.copies[node]):
                if i == 0:
                    start, present = pos, 1
                    end = model.new_int_var(last if node in keep else pos, last if node in keep else latest[node],
                                            f"e_{node}_0")  # fmt: skip
                    interval = model.new_interval_var(pos, end - pos + 1, end + 1, f"i_{node}_0")
                else:
                    # A recomputation happens after the first computation and by the last read.
                    present = model.new_bool_var(f"p_{node}_{i}")
                    start = model.new_int_var(pos + 1, latest[node], f"s_{node}_{i}")
                    end = model.new_int_var(pos + 1, latest[node], f"e_{node}_{i}")
                    size = model.new_int_var(1, latest[node] - pos, f"d_{node}_{i}")
                    model.add(size == end - start + 1)
                    model.add(start >= self.ends[node, i - 1] + 2).only_enforce_if(present)
                    model.add_implication(present, self.present[node, i - 1])
                    # Absent intervals are pinned, so they leave no freedom to search over.
                    model.add(start == pos + 1).only_enforce_if(~present)
                    model.add(end == pos + 1).only_enforce_if(~present)
                    interval = model.new_optional_interval_var(start, size, end + 1, present, f"i_{node}_{i}")
                    self.sizes[node, i] = size
                self.starts[node, i], self.ends[node, i], self.present[node, i] = start, end, present
                intervals.append(interval)
                demands.append(int(graph.nodes[node]["mem"]))
        if minimize_budget:
            total = sum(int(graph.nodes[v]["mem"]) for v in order)
            self.capacity_range = min(int(budget), total), max(total, 1)
            self.capacity = model.new_int_var(*self.capacity_range, "capacity")
        else:
            self.capacity = int(budget)
        model.add_cumulative(intervals, demands, self.capacity)
        self.covers = {}
        for u, v in graph.edges:
            for i in range(self.copies[v]):
                self._precedence(u, v, i)
        recompute = [self.present[node, i] * self.costs[node] for (node, i) in self.present if i > 0]
        self.cost = sum(recompute) if recompute else 0
        if minimize_budget:
            model.minimize(self.capacity)
        else:
            model.minimize(self.cost)

    def _precedence(self, u, v, i):
        """Some interval of u covers the start of v's interval i (when that one is present).
        u's first interval starts before v anyway, so only its end is compared; a later one
        needs a boolean saying it is the one that covers."""
        model, start, present = self.model, self.starts[v, i], self.present[v, i]
        if self.copies[u] == 1:
            constraint = model.add(self.ends[u, 0] >= start)
            if i:
                constraint.only_enforce_if(present)
            return
        options = []
        for j in range(self.copies[u]):
            covers = model.new_bool_var(f"c_{u}_{v}_{i}_{j}")
            model.add(self.ends[u, j] >= start).only_enforce_if(covers)
            if j:
                model.add_implication(covers, self.present[u, j])
                model.add(self.starts[u, j] <= start).only_enforce_if(covers)
            self.covers[u, v, i, j] = covers
            options.append(covers)
        if i:
            model.add_bool_or(options).only_enforce_if(present)
        else:
            model.add_bool_or(options)

    def hint(self, intervals: dict) -> None:
        """Hint every variable from ``intervals`` (a schedule this model allows); the capacity,
        where it is a variable, with the schedule's peak. A complete hint is CP-SAT's first
        solution as soon as its presolve is done; without the capacity's (once hinted 0: a
        proto's repeated field has no index -1) CP-SAT had to repair the hint first."""
        add = self.model.add_hint
        if not isinstance(self.capacity, int):
            low, high = self.capacity_range
            add(self.capacity, min(max(peak_memory(self.graph, self.order, intervals), low), high))

        def covering(node, t):
            return next((j for j, (s, e) in enumerate(intervals[node]) if s <= t <= e), None)

        for node in self.order:
            spans = intervals[node]
            pos = self.position[node]
            for i in range(self.copies[node]):
                present = i < len(spans)
                start, end = spans[i] if present else (pos + 1, pos + 1)
                if i:
                    add(self.present[node, i], present)
                    add(self.starts[node, i], start)
                    add(self.sizes[node, i], end - start + 1)
                add(self.ends[node, i], end)
        for (u, v, i, j), covers in self.covers.items():
            add(covers, i < len(intervals[v]) and covering(u, intervals[v][i][0]) == j)

    def intervals(self, solver: cp_model.CpSolver) -> dict:
        found = {}
        for node in self.order:
            spans = []
            for i in range(self.copies[node]):
                if solver.value(self.present[node, i]):
                    spans.append((solver.value(self.starts[node, i]), solver.value(self.ends[node, i])))
            found[node] = spans
        return found


class _Progress(cp_model.CpSolverSolutionCallback):
    """Records (seconds since the solve started, objective) for every solution; with
    ``stop_at``, stops the search once the objective is that low. ``best`` is the lowest
    integer objective so far (the hint's, to begin with) and ``improved`` when the search last
    lowered it (or first reported a solution: the search proper starts after presolve) by
    more than ``min_gain`` of its distance to ``stop_at`` (lowering the peak to a budget:
    steps of a few bytes on the way to a budget far below are no progress)."""

    def __init__(self, started: float, scale: float, stop_at: float | None = None, best: float | None = None,
                 min_gain: float = 0.0):  # fmt: skip
        super().__init__()
        self.started, self.scale, self.stop_at, self.trace = started, scale, stop_at, []
        self.best, self.improved, self._reported, self.min_gain = best, time.perf_counter(), False, min_gain
        self._mark = best

    def on_solution_callback(self):
        value = self.objective_value
        self.trace.append((time.perf_counter() - self.started, value / self.scale))
        floor = self.stop_at or 0
        if not self._reported or self._mark is None or value < self._mark - self.min_gain * (self._mark - floor):
            self.improved, self._mark = time.perf_counter(), value
        self._reported = True
        self.best = value if self.best is None else min(self.best, value)
        if self.stop_at is not None and value <= self.stop_at:
            self.stop_search()

    def rival(self, value: float | None) -> None:
        """A schedule found beside the search costs ``value`` (integer objective; None: none
        was): from now on only solutions below it count as progress, and the gap rule
        measures it. GPT-2's step: CP-SAT went on from the descents' 5.17M towards the
        polish's 4.01M for 10 s, each step resetting the stall rule's wait, and the plan was
        the polish's."""
        if value is not None and (self.best is None or value < self.best):
            self.best = value
            self._mark = value if self._mark is None else min(self._mark, value)


class _Watch:
    """Stops a CP-SAT search from a second thread (``CpSolver.stop_search`` is thread-safe)
    once it is not worth going on, and says why (``reason``):

    - "gap": (objective - bound) / objective is at most ``gap`` (minimising, integer
      objectives, as CP-SAT has them);
    - "bound": the proved bound is above ``bound_above`` (minimising the peak: the budget is
      proved out of reach, the search need not go on to the smallest peak);
    - "stalled": no better solution for ``max(stall_seconds, stall_share * t)`` seconds, t the
      time since ``started``; the longer a solve has run, the longer it is given (a solve
      that improves slowly but steadily is not cut short at once).

    ``stall_seconds=None`` and ``gap=0`` leave the search to the time limit (or a proof).
    """

    _POLL = 0.05  # seconds between looks: far below the smallest stall

    def __init__(self, solver: cp_model.CpSolver, progress: _Progress, started: float, stall_seconds: float | None,
                 stall_share: float, gap: float, bound_above: float | None = None):  # fmt: skip
        self.solver, self.progress, self.started = solver, progress, started
        self.stall_seconds, self.stall_share, self.gap, self.bound_above = stall_seconds, stall_share, gap, bound_above
        self.bound, self.reason = None, None
        solver.best_bound_callback = self._on_bound
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moccasin-watch", daemon=True)

    def _on_bound(self, bound: float) -> None:
        self.bound = bound

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.solver.best_bound_callback = None

    def check(self, now: float) -> str | None:
        best, bound = self.progress.best, self.bound
        if bound is not None and best is not None and self.gap > 0 and best - bound <= self.gap * abs(best):
            return "gap"
        if bound is not None and self.bound_above is not None and bound > self.bound_above:
            return "bound"
        if self.stall_seconds is not None:
            if now - self.progress.improved >= max(self.stall_seconds, self.stall_share * (now - self.started)):
                return "stalled"
        return None

    def _run(self) -> None:
        while not self._done.wait(self._POLL):
            reason = self.check(time.perf_counter())
            if reason is not None:
                self.reason = reason
                # Asked again until the search ends: a stop before CP-SAT's own set-up is lost.
                while not self._done.is_set():
                    self.solver.stop_search()
                    self._done.wait(self._POLL)
                return


def _solver(time_limit: float, workers: int, seed: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    return solver


def lower_bound_budget(graph: nx.DiGraph, order: list, keep=()) -> int:
    """No schedule fits below this: computing a node needs it and all its inputs at once,
    and ``keep`` nodes all stay to the end."""
    needed = [graph.nodes[v]["mem"] + sum(graph.nodes[u]["mem"] for u in graph.predecessors(v)) for v in order]
    return max(max(needed, default=0), sum(graph.nodes[v]["mem"] for v in keep))


# Early stopping (``solve``): phase two stops once the cost is within GAP of the proved bound,
# or when it has not improved for max(STALL_SECONDS, STALL_SHARE * the time so far). On the
# RL graphs and the models' training steps (``benchmarks/remat.py --part speed``) the search
# finds nearly all it will find in its first seconds and then improves by fractions of a
# percent per minute.
GAP = 0.01
STALL_SECONDS = 2.0
STALL_SHARE = 0.25
# Phase one, when the budget is hard to meet (or cannot be met), stops on the same stall rule:
# the local search's kicks, and CP-SAT lowering the peak, count as progress only a fall of the
# memory over the budget by this share of it (both go on creeping towards a budget they never
# reach: an infeasible budget would otherwise keep them to the time limit).
SEARCH_GAIN = 0.01


def solve(
    graph: nx.DiGraph,
    order: list,
    budget: int,
    *,
    intervals_per_node: int = 2,
    time_limit: float = 60.0,
    workers: int = 8,
    keep=(),
    seed: int = 0,
    find_smallest_budget: bool = True,
    search_share: float = 0.5,
    gap: float = GAP,
    stall_seconds: float | None = STALL_SECONDS,
    stall_share: float = STALL_SHARE,
    starts: dict | None = None,
    search_kicks: bool = True,
    local_search: bool = True,
    late_starts: Callable[[], dict] | None = None,
    polish_start: str | None = None,
) -> Schedule:
    """The cheapest schedule within ``budget`` found in ``time_limit`` seconds.

    ``keep``: nodes that must stay in memory to the end (the graph's outputs). When the budget
    is infeasible the result says so and, with ``find_smallest_budget``, carries the smallest
    budget a schedule was found for (``smallest_feasible_budget``), searched in the time left.

    Phase one: ``search_share`` is the part of the time limit the local search may use; it
    stops once it has a schedule within the budget, usually within a second. ``starts`` maps
    names to schedules found elsewhere (a min-cut partition, checkpointing every block:
    ``passes.remat.hints``); those that are valid, fit the budget and respect
    ``intervals_per_node`` compete with the local search, and phase two begins from the
    cheapest. The search kicks (perturbs its closest schedule and goes on) only when no start
    fits and ``search_kicks`` (False: a caller has searched with kicks at this budget before,
    ``greedy_schedule``, and found nothing). ``local_search=False``: a caller's local search
    at this budget and setting is among ``starts`` (its descents would find it again); the
    search runs only when no start fits. The result says which (``phase_one``: "plain",
    "local search", "cp-sat" or a start's name), what each candidate cost (``start_costs``)
    and when the first schedule was there (``seconds_to_first``); its ``trace`` starts with
    its cost.

    ``late_starts``: a function that returns more starts (slow Python work: min-cut's
    partitions). Where phase one has a schedule without them, it runs in the calling thread
    while CP-SAT's phase two runs in another (CP-SAT releases the GIL), and the result is the
    cheapest of phase two's and theirs that fit; where it has none, it runs first and they
    join the starts. The local search's schedule is polished (``_Repair.polish``) there too:
    phase two begins from the descents' own. From the polished one CP-SAT often finds nothing
    better before the stall rule stops it (an 80-node graph: 33 where from the descents' 38 it
    reached the optimum, 30, in 2 s), and each finds what the other misses (GPT-2's step: the
    polish 4.01M, CP-SAT from the descents' 4.0-4.7M in 5 s). ``polish_start``: the name of
    a start that is the caller's local search's (``greedy_schedule(polish=False)``), to be
    polished so too.

    Early stopping: phase two stops before the time limit once the cost is within ``gap`` of
    the proved lower bound ((cost - bound) / cost), or when no better schedule came for
    ``max(stall_seconds, stall_share * t)`` seconds, t the time since the solve began. Phase
    one stops on the same rule when the local search's kicks and CP-SAT lowering the peak stop
    closing in on the budget (by ``SEARCH_GAIN`` of the excess), so a budget that cannot be
    met fails in seconds. ``stall_seconds=None`` and ``gap=0`` run to the time limit (or a
    proof of optimality). The result says why it stopped (``stopped``: "optimal", "gap",
    "stalled", "time_limit"; with no schedule, "infeasible" when that is proved, else
    "stalled" or "time_limit").
    """
    check_problem(graph, order, budget)
    if intervals_per_node < 1:
        raise ScheduleError("intervals_per_node must be at least 1")
    if not 0 <= gap < 1:
        raise ScheduleError(f"gap must be in [0, 1), not {gap}")
    if stall_seconds is not None and not stall_seconds > 0:
        raise ScheduleError(f"stall_seconds must be above 0 (or None: no stall stop), not {stall_seconds}")
    keep = set(keep)
    started = time.perf_counter()
    stopping = {"gap": gap, "stall_seconds": stall_seconds, "stall_share": stall_share}
    baseline = no_remat_intervals(graph, order, keep)
    if peak_memory(graph, order, baseline) <= budget:
        # Phase one is free: the plain schedule fits and costs nothing, which is optimal.
        seconds = time.perf_counter() - started
        return Schedule("optimal", 0.0, 0.0, baseline, seconds, "moccasin", budget, peak_memory(graph, order, baseline),
                        trace=[(seconds, 0.0)], phase_one="plain", seconds_to_first=seconds,
                        stopped="optimal")  # fmt: skip
    if budget < lower_bound_budget(graph, order, keep):
        result = Schedule("infeasible", solver="moccasin", budget=budget, stopped="infeasible")
        if find_smallest_budget:
            result.smallest_feasible_budget, result.smallest_intervals = _smallest_budget(
                graph, order, intervals_per_node, keep, time_limit, workers, seed, started, stopping
            )
        result.seconds = time.perf_counter() - started
        return result

    # Phase one: schedules within the budget, from the starts given and by local search, else
    # by CP-SAT from the search's closest.
    copies = interval_counts(graph, order, intervals_per_node, keep)
    candidates = {name: spans for name, spans in (starts or {}).items()
                  if _usable_start(graph, order, spans, budget, keep, copies)}  # fmt: skip
    stall = None if stall_seconds is None else (stall_seconds, stall_share, started)
    polished = None  # the search's schedule, to be polished while phase two runs
    if local_search or not candidates:
        search = _search(graph, order, budget, intervals_per_node, keep, time_limit * search_share, seed, stall,
                         kicks=search_kicks and not candidates, polish=False)  # fmt: skip
        if search.fits():
            candidates = {"local search": search.intervals(), **candidates}
            polished = search

    def usable(found: dict) -> dict:
        return {name: spans for name, spans in found.items() if _usable_start(graph, order, spans, budget, keep, copies)}

    if not candidates and late_starts is not None:
        candidates, late_starts = usable(late_starts()), None
    if polished is None and polish_start in candidates:
        polished = _Repair(graph, order, budget, intervals_per_node, keep)
        polished.follow(candidates[polish_start])
    if not candidates:
        first, status, smallest, stopped = _lower_the_peak(graph, order, budget, intervals_per_node, keep,
                                                           search.intervals(),
                                                           time_limit - (time.perf_counter() - started), workers,
                                                           seed, started, stopping)  # fmt: skip
        if first is None:
            result = Schedule(status, solver="moccasin", budget=budget, stopped=stopped)
            if find_smallest_budget and smallest is not None:
                result.smallest_feasible_budget, result.smallest_intervals = smallest
            result.seconds = time.perf_counter() - started
            return result
        candidates = {"cp-sat": first}
    start_costs = {name: recompute_cost(graph, spans) for name, spans in candidates.items()}
    phase_one = min(start_costs, key=start_costs.get)  # the first listed among equals
    first, first_cost = candidates[phase_one], start_costs[phase_one]
    seconds_to_first = time.perf_counter() - started

    # Phase two: the cheapest schedule, starting from the first one.
    cheapest = _Model(graph, order, budget, intervals_per_node, keep)
    cheapest.hint(first)
    left = time_limit - (time.perf_counter() - started)
    solver = _solver(left, workers, seed)

    # Compared on CP-SAT's integer costs: the scaled float costs round differently, and a
    # proved optimum equal to the hint must not read as worse than it.
    def scaled(spans: dict) -> int:
        return sum(cheapest.costs[node] * (len(spans[node]) - 1) for node in spans)

    first_scaled = scaled(first)
    progress = _Progress(started, cheapest.scale, best=first_scaled)
    late = {}
    # the polish runs beside phase two, which begins from the descents' schedule; what it and
    # the late starts find is the search's rival once they are done
    beside = late_starts if polished is None else _with_polish(polished, late_starts)
    with _Watch(solver, progress, started, **stopping) as watch:
        status = _solve_beside(solver, cheapest.model, progress, beside, late,
                               lambda found: min(map(scaled, usable(found).values()), default=None))  # fmt: skip
    stopped = "optimal" if status == cp_model.OPTIMAL else watch.reason or "time_limit"
    trace = [(seconds_to_first, first_cost)]
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) and solver.objective_value <= first_scaled:
        intervals = cheapest.intervals(solver)
        objective = recompute_cost(graph, intervals)
        bound = solver.best_objective_bound / cheapest.scale
        label = _STATUS[status]
        trace += [(seconds, value) for seconds, value in progress.trace if value < trace[-1][1]]
    else:  # time ran out in phase two: the phase-one schedule stands
        intervals = first
        objective = first_cost
        bound = solver.best_objective_bound / cheapest.scale if status == cp_model.FEASIBLE else 0.0
        label = "feasible"
    late = usable(late)
    start_costs |= {name: recompute_cost(graph, spans) for name, spans in late.items()}
    cheaper = min(late, key=start_costs.get, default=None)
    if cheaper is not None and start_costs[cheaper] < objective:  # phase two did not start from it
        intervals, objective, phase_one, label = late[cheaper], start_costs[cheaper], cheaper, "feasible"
        trace.append((time.perf_counter() - started, objective))
    return Schedule(label, objective, min(bound, objective), intervals, time.perf_counter() - started, "moccasin",
                    budget, peak_memory(graph, order, intervals), trace=trace, phase_one=phase_one,
                    seconds_to_first=seconds_to_first, stopped=stopped, start_costs=start_costs)  # fmt: skip


def usable_start(graph: nx.DiGraph, order: list, intervals, budget: int, intervals_per_node: int, keep=()) -> bool:
    """Whether ``intervals`` can start ``solve`` at this many intervals per node (and budget)."""
    return _usable_start(graph, order, intervals, budget, set(keep), interval_counts(graph, order, intervals_per_node, keep))


def _with_polish(search: _Repair, late_starts: Callable[[], dict] | None) -> Callable[[], dict]:
    """Late starts: ``search``'s schedule polished, and ``late_starts``'."""

    def work() -> dict:
        search.polish(POLISH_SECONDS)
        return {"local search, polished": search.intervals(), **(late_starts() if late_starts else {})}

    return work


def _solve_beside(solver: cp_model.CpSolver, model: cp_model.CpModel, progress, work: Callable[[], dict] | None,
                  into: dict, worth: Callable[[dict], float | None] = lambda found: None) -> int:  # fmt: skip
    """``solver.solve(model, progress)``, with ``work()`` (when given) run meanwhile in this
    thread and its result put in ``into``; where ``work`` raises, the search is stopped. The
    stall rule's wait counts from when ``work`` is done at the earliest: on two cores the
    polish beside it left CP-SAT too little of them to reach the optimum, 30, of an 80-node
    graph before the rule stopped it (32 and 33). ``worth(into)``: the cheapest integer cost
    of what ``work`` found that can stand as the plan, the search's rival from then on
    (``_Progress.rival``)."""
    if work is None:
        return solver.solve(model, progress)
    outcome = {}

    def search():
        try:
            outcome["status"] = solver.solve(model, progress)
        except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=search, name="cp-sat phase two", daemon=True)
    thread.start()
    try:
        into.update(work())
        progress.rival(worth(into))
        # it shared the cores with the search: the stall rule's wait begins no sooner than now
        progress.improved = max(progress.improved, time.perf_counter())
    except BaseException:
        solver.stop_search()
        thread.join()
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["status"]


def _usable_start(graph, order, intervals, budget, keep, copies) -> bool:
    """Whether ``intervals`` can start phase two: a valid schedule within the budget with no
    more intervals per node than the model has, each recomputation at least two steps after
    the interval before it (the model's form: a gap of one would be one longer interval)."""
    if not isinstance(intervals, dict) or set(intervals) != set(graph.nodes):
        return False
    try:
        validate(graph, order, intervals, budget, keep)
    except ScheduleError:
        return False
    return all(
        len(spans) <= copies[node] and all(spans[k][0] >= spans[k - 1][1] + 2 for k in range(1, len(spans)))
        for node, spans in intervals.items()
    )


def _lower_the_peak(graph, order, budget, intervals_per_node, keep, closest, time_limit, workers, seed, started,
                    stopping):  # fmt: skip
    """Phase one by CP-SAT: minimise the peak, starting from ``closest`` (a valid schedule over
    the budget), and stop once it is within the budget, once its bound proves the budget out
    of reach, or as ``stopping`` says (``_Watch``; no gap stop: only the budget matters).
    Returns (intervals or None, status, (the smallest peak found: an upper bound on the
    smallest feasible budget, the schedule that reaches it) or None, why it stopped without a
    schedule: "infeasible" when proved,
    "stalled" by the stall rule, else "time_limit")."""
    model = _Model(graph, order, budget, intervals_per_node, keep, minimize_budget=True)
    model.hint(closest)
    # Most of the time goes to finding a first schedule: without one there is nothing to
    # improve; once found, the rest improves it.
    solver = _solver(time_limit * 0.8, workers, seed)
    progress = _Progress(time.perf_counter(), 1.0, stop_at=budget, min_gain=SEARCH_GAIN)
    with _Watch(solver, progress, started, stopping["stall_seconds"], stopping["stall_share"], 0.0, budget) as watch:
        status = solver.solve(model.model, progress)
    unproved = "stalled" if watch.reason == "stalled" else "time_limit"
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.INFEASIBLE:
            return None, "infeasible", None, "infeasible"
        return None, "unknown", None, unproved
    smallest = int(solver.value(model.capacity))
    if smallest <= budget:
        return model.intervals(solver), "feasible", None, None
    proved = status == cp_model.OPTIMAL or watch.reason == "bound" or solver.best_objective_bound > budget
    return None, "infeasible" if proved else "unknown", (smallest, model.intervals(solver)), \
        "infeasible" if proved else unproved


# The local search's descents supply a recomputation's missing inputs with chains this deep
# (``_Repair``'s ``depth``), each depth tried while the search has taken less than
# DEEPER_SECONDS. Training steps need chains: a ReLU recomputed from its batch norm's output
# recomputed from the convolution's; at 0.5 of the activation memory the descents meet the
# budget on HF T5 only from depth 2, on GPT-2 from 3, and find Llama schedules 28% cheaper at
# 2, and on T5 the cheapest at 3 (2.67M FLOPs against 7.05M at 2). On random layered graphs
# the deeper chains change little, and on the dense 1000-node ones (15 s for depth 1, 45 s for
# depth 3) the time rule keeps them out; at 1 s it kept T5's depth 3 out on a loaded machine.
SEARCH_DEPTHS = (1, 2, 3)
DEEPER_SECONDS = 2.0
# A schedule that fits is then polished (``_Repair.polish``): recomputations dropped (the
# POLISH_PAIRS dearest one at a time, then two at a time, then the rest one at a time) and the
# overflow repaired with chains up to POLISH_DEPTHS deep, recomputed early where there is
# room; a cheaper schedule that fits is kept and the polish starts again from it, until
# POLISH_PATIENCE tries in a row found none cheaper (or POLISH_SECONDS are up). On the tests'
# Hugging Face models at 0.5 of their activations (4 intervals): GPT-2 5.17M -> 4.01M FLOPs
# (the 60-s CP-SAT schedule's cost; the last step drops two matrix products for one),
# Llama eager 1.34M -> 1.13M (60 s of CP-SAT: 1.33M), RoBERTa 3.86M -> 2.24M, a ResNet-style
# step 38.3M -> 34.1M; T5, BERT, ViT and Llama sdpa unchanged. The successes came within 42
# tries of each other on GPT-2; a try takes 5-15 ms on these graphs.
POLISH_PAIRS = 6
POLISH_DEPTHS = (1, 2, 3, 4)
POLISH_PATIENCE = 50
POLISH_SECONDS = 2.0


def greedy_schedule(graph: nx.DiGraph, order: list, budget: int, intervals_per_node: int = 2, keep=(), *,
                    time_limit: float = 10.0, seed: int = 0, stall_seconds: float | None = None,
                    kicks: bool = True, polish: bool = True) -> dict | None:  # fmt: skip
    """A quick schedule within ``budget`` by local search (see ``_Repair``), or None when the
    search finds none in ``time_limit`` seconds (or, with ``stall_seconds``, once its kicks
    closed in on the budget by less than ``SEARCH_GAIN`` of the excess for that long;
    ``kicks=False``: once its descents found none, in milliseconds). Used to start the exact
    search: CP-SAT alone can take minutes to find a first schedule on graphs of a thousand
    nodes. ``polish=False``: the descents' (or kicks') schedule as it is (``solve``'s
    ``polish_start`` polishes it later)."""
    check_problem(graph, order, budget)
    stall = None if stall_seconds is None else (stall_seconds, 0.0, time.perf_counter())
    search = _search(graph, order, budget, intervals_per_node, set(keep), time_limit, seed, stall, kicks, polish)
    return search.intervals() if search.fits() else None


def _search(graph, order, budget, intervals_per_node, keep, time_limit, seed, stall=None, kicks=True,
            polish=True) -> _Repair:  # fmt: skip
    """Three descents from the plain schedule, scoring moves by the overflow they remove per
    unit of recomputation cost to the power 1, 0.5 and 0 (cheaper schedules first, tighter
    budgets last), for each of ``SEARCH_DEPTHS`` while the search has taken less than
    ``DEEPER_SECONDS``: the cheapest that fits; when none does and ``kicks``, the closest goes
    on with kicks (``_Repair.run``, ``stall`` its stall rule) in the time left. One that fits
    is polished (``_Repair.polish``) where ``polish``."""
    started = time.perf_counter()
    searches = []
    for depth in SEARCH_DEPTHS:
        if searches and time.perf_counter() - started >= DEEPER_SECONDS:
            break
        for weight in (1.0, 0.5, 0.0):
            left = time_limit - (time.perf_counter() - started)
            if searches and left <= 0:
                break
            search = _Repair(graph, order, budget, intervals_per_node, keep, cost_weight=weight, seed=seed, depth=depth)
            search.run(left)
            if search.fits():
                search.prune()
            searches.append(search)
    best = min(searches, key=_Repair.rank)
    if kicks and not best.fits():
        best.run(time_limit - (time.perf_counter() - started), kicks=True, stall=stall)
        if best.fits():
            best.prune()
    if polish:
        best.polish(min(POLISH_SECONDS, time_limit - (time.perf_counter() - started)))
    return best


def _spans(comps: list, reads: list) -> list:
    """Intervals from computation times and read times (both sorted): each computation lasts
    until the last read before the next computation."""
    spans = []
    for k, start in enumerate(comps):
        stop = bisect.bisect_left(reads, comps[k + 1]) if k + 1 < len(comps) else len(reads)
        spans.append((start, reads[stop - 1] if stop and reads[stop - 1] >= start else start))
    return spans


def _wasted(spans: list, reads: list) -> int | None:
    """The first recomputation that serves no read or leaves no gap before it, or None."""
    for k in range(1, len(spans)):
        start, end = spans[k]
        following = bisect.bisect_left(reads, start)
        if start < spans[k - 1][1] + 2 or following == len(reads) or reads[following] > end:
            return k
    return None


class _Repair:
    """Local search for a schedule within the budget, over computation times: each node (by
    position) has sorted ``comps`` (its position, then its recomputations) and ``reads`` (the
    computation times of its users, and the last time for ``keep`` nodes); its intervals
    follow (``_spans``), so every schedule it holds is valid and only the memory can be over.

    A move, at a time t over the budget, drops a tensor alive at t but not read then and
    recomputes it at a later time b: at its next read with its missing inputs supplied there
    (kept longer, recomputed at b themselves, a chain, or recomputed when their own inputs
    are last alive), or at the time in between that frees the most memory net of keeping its
    inputs longer. Where none of these lowers the overflow at any of the worst times, also at
    the time in between with the least memory, its inputs supplied there, then kept to its
    read: the chain is recomputed where there is room, not all at once at the read (a
    ResNet-style step at 0.5 of its activations then meets the budget recomputing ReLUs and
    batch-norm outputs, 38M FLOPs, where it needed 66M of convolutions). A tensor with no
    interval left moves its last recomputation instead.
    Moves are estimated from prefix sums over the profile, the best ``candidates`` measured
    exactly, and taken (up to ``batch`` of them while they still help) by what they remove of
    the penalty (memory over the budget, weighted ``over_weight``, plus memory over a target
    ``margin`` below it) per unit of recomputation cost to the power ``cost_weight``.
    """

    def __init__(self, graph, order, budget, intervals_per_node, keep, cost_weight=1.0, noise=0.05, seed=0,
                 candidates=40, targets=20, depth=1, batch=10, margin=0.03, over_weight=10, patience=100,
                 kick_window=0.05, kick_share=1 / 3):  # fmt: skip
        n = self.n = len(order)
        position = {node: t for t, node in enumerate(order)}
        self.order, self.budget = order, budget
        self.target, self.over_weight = budget - margin * budget, over_weight
        self.mem = [int(graph.nodes[v]["mem"]) for v in order]
        self.cost = [float(graph.nodes[v]["cost"]) for v in order]
        self.parents = [[position[u] for u in graph.predecessors(v)] for v in order]
        counts = interval_counts(graph, order, intervals_per_node, keep)
        self.slots = [counts[v] for v in order]
        self.comps = [[t] for t in range(n)]
        self.reads = [sorted(position[u] for u in graph.successors(v)) + ([n - 1] if v in keep else []) for v in order]
        self._rebuild()
        self.cost_weight, self.noise, self.rng = cost_weight, noise, random.Random(seed)
        self.candidates, self.targets, self.depth, self.batch = candidates, targets, depth, batch
        self.patience, self.kick_window, self.kick_share = patience, kick_window, kick_share
        self.early_always = False  # early chains among every time's moves, not only as a last resort

    def _rebuild(self) -> None:
        """Intervals and the memory profile from the computation and read times."""
        n = self.n
        self.spans = [_spans(self.comps[t], self.reads[t]) for t in range(n)]
        change = np.zeros(n + 1, np.int64)
        for t in range(n):
            for start, end in self.spans[t]:
                change[start] += self.mem[t]
                change[end + 1] -= self.mem[t]
        self.profile = np.cumsum(change)[:n]

    def follow(self, intervals: dict) -> None:
        """Take the recomputations of ``intervals`` (a schedule in this search's form)."""
        for t, node in enumerate(self.order):
            for start, _ in intervals[node][1:]:
                self._change(t, start, 1)
        self._rebuild()

    def overflow(self) -> int:
        return int(np.maximum(self.profile - self.budget, 0).sum())

    def fits(self) -> bool:
        return bool(self.profile.max(initial=0) <= self.budget)

    def intervals(self) -> dict:
        return {self.order[t]: list(self.spans[t]) for t in range(self.n)}

    def run(self, time_limit: float, kicks: bool = False, stall: tuple | None = None) -> None:
        """Take improving moves until the schedule fits, none is left or time runs out; when
        none is left, again without the target below the budget (room near the times over
        the budget no longer counts, so the last moves are not held back by it). With
        ``kicks``, then undo a random third of the recomputations near the worst time and go
        on, until ``patience`` kicks in a row found nothing closer, or (``stall``: seconds,
        share, started) the overflow fell by less than ``SEARCH_GAIN`` of itself for
        max(seconds, share * time since started), or, after that many seconds of kicks, while
        the overflow (summed over time) is more than the budget, their pace so far would not
        bring it to 0 by the time limit (a 1000-node graph at 0.6 of its peak, none found in a
        minute: 17754 to 16853 in 13 s of kicks, each 2 s window closer by 1% or more; nearer
        the budget a kick may fit at once: 9 over, then 4, then a fit, in 0.2 s); the closest
        state is kept."""
        deadline = time.perf_counter() + time_limit
        closest, since_closest = None, 0
        mark, marked = None, time.perf_counter()
        kicked = None  # (when the kicks began, the overflow then)
        while self._descend(deadline) is False:
            target, self.target = self.target, self.budget
            finished = self._descend(deadline)
            self.target = target
            if finished is not False or not kicks:
                break
            if closest is None or self.overflow() < closest[0]:
                closest, since_closest = self._snapshot(), 0
            elif since_closest == self.patience:
                break
            if stall is not None:
                now = time.perf_counter()
                if mark is None or closest[0] < mark * (1 - SEARCH_GAIN):
                    mark, marked = closest[0], now
                elif now - marked >= max(stall[0], stall[1] * (now - stall[2])):
                    break
                kicked = kicked or (now, closest[0])
                if closest[0] > self.budget and now - kicked[0] >= stall[0]:
                    pace = (kicked[1] - closest[0]) / (now - kicked[0])
                    if pace * (deadline - now) < closest[0]:
                        break
            since_closest += 1
            self._kick()
        if closest is not None and closest[0] < self.overflow():
            _, self.comps, self.reads, self.spans, self.profile = closest

    def _descend(self, deadline: float) -> bool | None:
        """Improving moves at the worst times: True once it fits, False when none is left,
        None when time ran out."""
        while time.perf_counter() < deadline:
            excess = self.profile - self.budget
            over = np.flatnonzero(excess > 0)
            if not len(over):
                return True
            self._worst = over[np.argsort(-excess[over], kind="stable")][: self.targets]
            if not any(self._improve(int(t), self.early_always) for t in self._worst) and (
                self.early_always or not any(self._improve(int(t), early_chains=True) for t in self._worst)
            ):
                return False
        return None

    def _snapshot(self) -> tuple:
        return self.overflow(), [list(c) for c in self.comps], [list(r) for r in self.reads], list(self.spans), \
            self.profile.copy()

    def _restore(self, state: tuple) -> None:
        _, self.comps, self.reads, self.spans, self.profile = state

    def total_cost(self) -> float:
        return sum(self.cost[v] * (len(self.comps[v]) - 1) for v in range(self.n))

    def polish(self, time_limit: float) -> None:
        """Where the schedule fits: drop recomputations (see ``POLISH_PAIRS``), repair the
        overflow by cost (weight 1) with chains of each of ``POLISH_DEPTHS``, early chains
        among every time's moves, and keep the result when it fits and costs less; then
        again from the new schedule, until ``POLISH_PATIENCE`` tries in a row found nothing
        cheaper or time runs out. The descents place a recomputation where the overflow is and
        stop once it fits; a dear one (a matrix product) often has a cheaper stand-in that
        only a repair from without it finds (GPT-2: GELU's pointwise chain recomputed before
        its read in place of a matrix product)."""
        if not self.fits():
            return
        deadline = time.perf_counter() + time_limit
        settings = self.cost_weight, self.depth, self.early_always
        self.cost_weight, self.early_always = 1.0, True
        best, tries = self.total_cost(), 0
        improved = True
        while improved:
            improved = False
            dearest = [(v, b) for _, v, b in sorted(((self.cost[v], v, b) for v in range(self.n) for b in self.comps[v][1:]),
                                                    reverse=True)]  # fmt: skip
            top = dearest[:POLISH_PAIRS]
            drops = [[d] for d in top] + [list(pair) for pair in itertools.combinations(top, 2)]
            drops += [[d] for d in dearest[POLISH_PAIRS:]]
            for drop in drops:
                for depth in POLISH_DEPTHS:
                    if tries >= POLISH_PATIENCE or time.perf_counter() >= deadline:
                        self.cost_weight, self.depth, self.early_always = settings
                        return
                    state = self._snapshot()
                    found = self._measure([(v, b, -1) for v, b in drop])
                    if found is None:
                        break
                    tries += 1
                    self._apply(*found[2:4])
                    self.depth = depth
                    self.run(deadline - time.perf_counter())
                    if self.fits():
                        self.prune()
                        if self.total_cost() < best:
                            best, improved, tries = self.total_cost(), True, 0
                            break
                    self._restore(state)
                if improved:
                    break
        self.cost_weight, self.depth, self.early_always = settings

    def _kick(self) -> None:
        t, window = int(self._worst[0]), int(self.n * self.kick_window)
        near = [(v, c) for v in range(self.n) for c in self.comps[v][1:] if abs(c - t) <= window]
        for v, c in self.rng.sample(near, int(len(near) * self.kick_share)):
            found = self._measure([(v, c, -1)])
            if found is not None:
                self._apply(*found[2:4])

    def _span_at(self, u, t) -> tuple[int, int]:
        """The interval of u's latest computation at or before t."""
        return self.spans[u][bisect.bisect_right(self.comps[u], t) - 1]

    def _change(self, v, b, sign) -> None:
        if sign > 0:
            bisect.insort(self.comps[v], b)
        else:
            self.comps[v].remove(b)
        for p in self.parents[v]:
            if sign > 0:
                bisect.insort(self.reads[p], b)
            else:
                self.reads[p].remove(b)

    def _measure(self, ops):
        """(penalty change, cost change, the ops with the removals they force, new spans,
        the highest memory where it changes), or None when a node would get too many
        intervals (or the ops no longer apply); the state is left as it was."""
        done, touched, allowed = [], set(), True
        for v, b, sign in ops:
            if (b in self.comps[v]) == (sign > 0) or (sign > 0 and len(self.comps[v]) >= self.slots[v]):
                allowed = False
                break
            self._change(v, b, sign)
            done.append((v, b, sign))
            touched.add(v)
            touched.update(self.parents[v])
        if allowed:
            queue = list(touched)
            while queue:  # recomputations left serving nothing (or leaving no gap) go too
                u = queue.pop()
                k = _wasted(_spans(self.comps[u], self.reads[u]), self.reads[u])
                if k is not None:
                    b = self.comps[u][k]
                    self._change(u, b, -1)
                    done.append((u, b, -1))
                    touched.update(self.parents[u])
                    queue += [u, *self.parents[u]]
            news = [(u, _spans(self.comps[u], self.reads[u])) for u in touched]
        for v, b, sign in reversed(done):
            self._change(v, b, -sign)
        if not allowed:
            return None
        news = [(u, new) for u, new in news if new != self.spans[u]]
        ranges = [(s, e, -self.mem[u]) for u, _ in news for s, e in self.spans[u]]
        ranges += [(s, e, self.mem[u]) for u, new in news for s, e in new]
        cost = sum(self.cost[v] * sign for v, _, sign in done)
        if not ranges:
            return 0, cost, done, news, 0
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        change = np.zeros(high - low + 2, np.int64)
        for s, e, m in ranges:
            change[s - low] += m
            change[e - low + 1] -= m
        before = self.profile[low : high + 1]
        after = before + np.cumsum(change)[:-1]
        delta = self._penalty(after).sum() - self._penalty(before).sum()
        return int(delta), cost, done, news, int(after.max())

    def _apply(self, done, news) -> None:
        for v, b, sign in done:
            self._change(v, b, sign)
        for u, new in news:
            for s, e in self.spans[u]:
                self.profile[s : e + 1] -= self.mem[u]
            for s, e in new:
                self.profile[s : e + 1] += self.mem[u]
            self.spans[u] = new

    def _penalty(self, memory: np.ndarray) -> np.ndarray:
        """What the search minimises at each time: the memory over the budget, and (weighted
        far less) the memory over a target a little below it, so that moves which make room
        next to the times over the budget count too (without them the profile settles on a
        plateau at the budget where every move adds overflow somewhere)."""
        return self.over_weight * np.maximum(memory - self.budget, 0) + np.maximum(memory - self.target, 0)

    def _prefix(self, kind: str, mem: int) -> np.ndarray:
        """Prefix sums over time, for the current profile, of the overflow a tensor of ``mem``
        bytes adds by being alive ("keep") or removes by being dropped ("drop")."""
        key = (kind, mem)
        if key not in self._prefixes:
            now = self._penalty(self.profile)
            step = self._penalty(self.profile + mem) - now if kind == "keep" else now - self._penalty(self.profile - mem)
            self._prefixes[key] = np.concatenate(([0], np.cumsum(step)))
        return self._prefixes[key]

    def _listed_prefix(self, kind: str, mem: int) -> list:
        """``_prefix`` as a list (faster to index one element at a time)."""
        key = (kind, mem)
        if key not in self._listed:
            self._listed[key] = self._prefix(kind, mem).tolist()
        return self._listed[key]

    def _keeping(self, u, first, last) -> int:
        """Overflow added by keeping u alive over [first, last] (on its own)."""
        if last < first:
            return 0
        prefix = self._listed_prefix("keep", self.mem[u])
        return prefix[last + 1] - prefix[first]

    def _supply(self, u, b, depth) -> tuple[int, tuple]:
        """(estimated overflow added, ops) to have u alive at time b: kept from its last
        interval, or recomputed at b with its own inputs supplied (memoised per profile)."""
        key = (u, b, depth)
        if key in self._supplies:
            return self._supplies[key]
        _, end = self._span_at(u, b)
        if end >= b:
            best = (0, ())
        else:
            best = (self._keeping(u, end + 1, b), ())
            if depth and len(self.comps[u]) < self.slots[u] and b >= end + 2:
                total, ops = self._keeping(u, b, b), ((u, b, 1),)
                for p in self.parents[u]:
                    added, more = self._supply(p, b, depth - 1)
                    total, ops = total + added, ops + more
                    if total >= best[0]:
                        break
                if total < best[0]:
                    best = (total, ops)
                inputs_alive = self._inputs_alive(u, end + 2, b)
                if inputs_alive is not None and inputs_alive < b:
                    total = self._keeping(u, inputs_alive, b)
                    if total < best[0]:
                        best = (total, ((u, inputs_alive, 1),))
        self._supplies[key] = best
        return best

    def _inputs_alive(self, u, first, last) -> int | None:
        """The latest time in [first, last] at which all of u's inputs are alive, or None."""
        t = last
        while t >= first:
            for p in self.parents[u]:
                _, end = self._span_at(p, t)
                if end < t:
                    t = end
                    break
            else:
                return t
        return None

    def _best_time(self, v, previous, t, following) -> tuple[int, int]:
        """(estimated overflow removed, time): the best time in (t, following] to recompute v
        with its inputs that are not alive then kept until then (each on its own). Tried:
        ``following`` and the last time each input is alive (where the next input's cost
        starts)."""
        dropped = self._listed_prefix("drop", self.mem[v])
        inputs = [(self._span_at(p, following), self._listed_prefix("keep", self.mem[p])) for p in self.parents[v]]
        best = None
        for b in {following, *(end for (start, end), _ in inputs if t < end < following)}:
            net = dropped[b] - dropped[previous + 1]
            for (start, end), kept in inputs:
                if b > end:  # (an input alive at b only from a later computation is kept from ``end``)
                    net -= kept[b + 1] - kept[end + 1]
            if best is None or net > best[0]:
                best = (net, b)
        return best

    def _with_inputs(self, v, b) -> tuple[int, list]:
        """(estimated overflow added, ops) to recompute v at b with its missing inputs supplied
        there (``_supply``: kept longer or recomputed, in chains up to ``depth``)."""
        added, chain = 0, ()
        for p in self.parents[v]:
            more, ops = self._supply(p, b, self.depth)
            added, chain = added + more, chain + ops
        return added, [(v, b, 1), *dict.fromkeys(chain)]

    def _early_time(self, previous, t, following) -> int | None:
        """The time in (t, following) with the least memory, where a recomputation and the
        chain that supplies its inputs cost the least room, to be kept from there to its read
        at ``following``; None where there is no such time (or it is ``following`` itself)."""
        first = max(t + 1, previous + 2)
        if first >= following:
            return None
        return first + int(np.argmin(self.profile[first:following]))

    def _moves(self, t, early_chains: bool = False) -> list:
        """Moves that drop a tensor alive at t and not read then: (estimated score, ops), the
        most promising first. The memory freed over the gap bounds a move's estimate, so
        tensors are estimated in the order of that bound until it cannot reach the best."""
        droppable = []
        for v in range(t):
            start, end = self._span_at(v, t)
            if not start < t < end or (len(self.comps[v]) == 1 and self.slots[v] == 1):
                continue
            reads = self.reads[v]
            following = bisect.bisect_left(reads, t)
            if reads[following] == t:
                continue
            previous = reads[following - 1] if following and reads[following - 1] >= start else start
            following = reads[following]
            weight = max(self.cost[v], 0.5) ** self.cost_weight
            dropped = self._prefix("drop", self.mem[v])
            gain = int(dropped[following] - dropped[previous + 1])
            droppable.append((gain / weight, gain, weight, v, previous, following))
        droppable.sort(key=lambda item: -item[0])
        found = []  # a heap of the best estimates: (score, tie-breaker, ops)
        for bound, gain, weight, v, previous, following in droppable:
            if len(found) == self.candidates and bound <= found[0][0]:
                break
            # With no interval left, its current recomputation moves here.
            prefix = [] if len(self.comps[v]) < self.slots[v] else [(v, self.comps[v][-1], -1)]
            added, ops = self._with_inputs(v, following)
            moves = [((gain - added) / weight, prefix + ops)]
            net, between = self._best_time(v, previous, t, following)
            if between != following:
                moves.append((net / weight, prefix + [(v, between, 1)]))
            early = self._early_time(previous, t, following) if early_chains else None
            if early is not None:
                added, ops = self._with_inputs(v, early)  # v stays alive from there on, as it is now
                moves.append(((dropped[early] - dropped[previous + 1] - added) / weight, prefix + ops))
            for score, ops in moves:
                item = (score, len(found) + len(droppable) * v + between, ops)
                if len(found) < self.candidates:
                    heapq.heappush(found, item)
                elif score > found[0][0]:
                    heapq.heapreplace(found, item)
        found = sorted(((score, ops) for score, _, ops in found), key=lambda item: -item[0])
        return [move for move in found if move[0] > 0] or found[: self.candidates // 4]

    def _improve(self, t, early_chains: bool = False) -> bool:
        """Take the best move that lowers the overflow, dropping a tensor over t."""
        self._prefixes, self._listed, self._supplies = {}, {}, {}
        measured = []
        for _, ops in self._moves(t, early_chains):
            found = self._measure(ops)
            if found is not None and found[0] < 0:
                delta, cost = found[:2]
                score = -delta / max(cost, 0.5) ** self.cost_weight * (1 + self.noise * self.rng.random())
                measured.append((score, ops, found))
        if not measured:
            return False
        measured.sort(key=lambda item: -item[0])
        self._apply(*measured[0][2][2:4])
        # Estimating moves costs more than measuring them: the next best go in too while
        # they still lower the overflow about as much per unit cost.
        for score, ops, _ in measured[1 : self.batch]:
            found = self._measure(ops)
            if found is not None and found[0] < 0 and -found[0] / max(found[1], 0.5) ** self.cost_weight >= score / 2:
                self._apply(*found[2:4])
        return True

    def prune(self) -> None:
        """Drop the recomputations (the costliest first) that the budget does not need."""
        if not self.fits():
            return
        recomputed = sorted(((self.cost[v], v, b) for v in range(self.n) for b in self.comps[v][1:]), reverse=True)
        for _, v, b in recomputed:
            found = self._measure([(v, b, -1)])
            if found is not None and found[4] <= self.budget:
                self._apply(*found[2:4])

    def rank(self) -> tuple:
        """Lower is better: any schedule that fits, the cheapest first, then the least overflow."""
        if self.fits():
            return 0, self.total_cost()
        return 1, self.overflow()


def _smallest_budget(graph, order, intervals_per_node, keep, time_limit, workers, seed, started,
                     stopping) -> tuple[int | None, dict | None]:  # fmt: skip
    """(The smallest capacity a schedule with this many intervals per node fits in, that
    schedule): the best found within the time limit, or until it stalls as ``stopping`` says
    (an upper bound on the true smallest), else (None, None). CP-SAT lowers the peak from the schedule the local search's descents
    end with at the floor no schedule goes below (``lower_bound_budget``; one that fits there
    is the answer), and only a fall of ``SEARCH_GAIN`` of the distance to the floor counts as
    progress. From the plain schedule, by steps of a few bytes, a two-layer Qwen2's went on for
    10 s (60 s on a slow host); from the plain schedule with that rule it stopped at 0.65 of
    the activations, from the search's at 0.43 (0.41 after the 10 s)."""
    floor = lower_bound_budget(graph, order, keep)
    left = max(time_limit - (time.perf_counter() - started), 0.0)
    search = _search(graph, order, floor, intervals_per_node, set(keep), left, seed, kicks=False)
    if search.fits():
        return floor, search.intervals()
    model = _Model(graph, order, 0, intervals_per_node, keep, minimize_budget=True)
    model.hint(search.intervals())
    solver = _solver(max(time_limit - (time.perf_counter() - started), 1.0), workers, seed)
    progress = _Progress(time.perf_counter(), 1.0, stop_at=floor, min_gain=SEARCH_GAIN)
    with _Watch(solver, progress, started, stopping["stall_seconds"], stopping["stall_share"], 0.0):
        status = solver.solve(model.model, progress)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return int(math.ceil(solver.value(model.capacity))), model.intervals(solver)
    return int(search.profile.max()), search.intervals()  # the search's schedule is valid, at its peak
