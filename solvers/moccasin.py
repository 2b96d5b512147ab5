"""Rematerialization with CP-SAT in the Moccasin formulation (Bartan et al., ICML 2023).

Over a fixed topological order, each node v gets C retention intervals (``intervals_per_node``):
the first is always present and starts at v's position; the others are optional, each a
recomputation of v at its start. Variables are O(C n) integers and booleans, against the
O(n^2) booleans of Checkmate's MILP.

- memory: one cumulative constraint over the present intervals, demand ``mem``, capacity the
  budget;
- precedence: for every edge (u, v) and every present interval of v, some present interval
  of u covers the interval's start (v's inputs are alive when v is computed);
- symmetry: interval i present implies interval i-1 present, and intervals are ordered;
- objective: the total ``cost`` of the present optional intervals.

Solved in two phases as in the paper: first any schedule within the budget (the schedule
without recomputation when it fits, else a greedy one, else CP-SAT without an objective), then
the minimum cost with that schedule as a hint.
"""

from __future__ import annotations

import math
import time

import networkx as nx
from ortools.sat.python import cp_model

from solvers.schedule import (
    Schedule,
    ScheduleError,
    check_problem,
    memory_profile,
    no_remat_intervals,
    peak_memory,
)

_STATUS = {
    cp_model.OPTIMAL: "optimal",
    cp_model.FEASIBLE: "feasible",
    cp_model.INFEASIBLE: "infeasible",
    cp_model.UNKNOWN: "unknown",
    cp_model.MODEL_INVALID: "invalid",
}


def _integer_costs(graph: nx.DiGraph) -> tuple[dict, float]:
    """CP-SAT needs integers: costs scaled so the largest is about 1e6 (ratios kept)."""
    costs = {node: float(data["cost"]) for node, data in graph.nodes(data=True)}
    largest = max(costs.values(), default=0.0)
    if largest == 0 or all(float(c).is_integer() and c <= 10**6 for c in costs.values()):
        return {n: int(c) for n, c in costs.items()}, 1.0
    scale = 10**6 / largest
    return {n: int(round(c * scale)) for n, c in costs.items()}, scale


class _Model:
    """The CP-SAT model for one problem; ``capacity`` is the budget, or a variable when the
    smallest feasible budget is sought."""

    def __init__(self, graph, order, budget, intervals_per_node, keep, minimize_budget=False):
        self.graph, self.order = graph, order
        self.position = {node: t for t, node in enumerate(order)}
        n = len(order)
        last = n - 1
        model = self.model = cp_model.CpModel()
        self.costs, self.scale = _integer_costs(graph)
        self.starts, self.ends, self.present = {}, {}, {}
        intervals, demands = [], []
        for node in order:
            pos = self.position[node]
            users = [self.position[u] for u in graph.successors(node)]
            last_use = last if node in keep else max(users, default=pos)
            copies = intervals_per_node if users else 1
            for i in range(copies):
                if i == 0:
                    start = model.NewConstant(pos)
                    present = model.NewConstant(1)
                    end = model.NewIntVar(pos, last, f"e_{node}_0")
                    if node in keep:
                        model.Add(end == last)
                else:
                    # A recomputation happens after the first computation and before the last use.
                    present = model.NewBoolVar(f"p_{node}_{i}")
                    start = model.NewIntVar(pos + 1, max(pos + 1, last_use), f"s_{node}_{i}")
                    end = model.NewIntVar(pos + 1, last, f"e_{node}_{i}")
                    previous_end = self.ends[node, i - 1]
                    model.Add(start >= previous_end + 2).OnlyEnforceIf(present)
                    model.AddImplication(present, self.present[node, i - 1])
                    # Absent intervals are pinned, so they leave no freedom to search over.
                    model.Add(start == pos + 1).OnlyEnforceIf(present.Not())
                    model.Add(end == pos + 1).OnlyEnforceIf(present.Not())
                model.Add(end >= start)
                size = model.NewIntVar(1, n, f"d_{node}_{i}")
                model.Add(size == end - start + 1)
                exclusive_end = model.NewIntVar(1, n, f"x_{node}_{i}")
                model.Add(exclusive_end == end + 1)
                interval = model.NewOptionalIntervalVar(start, size, exclusive_end, present, f"i_{node}_{i}")
                self.starts[node, i], self.ends[node, i], self.present[node, i] = start, end, present
                intervals.append(interval)
                demands.append(int(graph.nodes[node]["mem"]))
        self.copies = {node: 1 + sum(1 for (m, i) in self.present if m == node and i > 0) for node in order}
        if minimize_budget:
            total = sum(int(graph.nodes[v]["mem"]) for v in order)
            self.capacity = model.NewIntVar(0, max(total, 1), "capacity")
        else:
            self.capacity = int(budget)
        model.AddCumulative(intervals, demands, self.capacity)
        for u, v in graph.edges:
            for i in range(self.copies[v]):
                options = []
                for j in range(self.copies[u]):
                    covers = model.NewBoolVar(f"c_{u}_{v}_{i}_{j}")
                    model.AddImplication(covers, self.present[u, j])
                    model.Add(self.starts[u, j] <= self.starts[v, i]).OnlyEnforceIf(covers)
                    model.Add(self.ends[u, j] >= self.starts[v, i]).OnlyEnforceIf(covers)
                    options.append(covers)
                model.AddBoolOr(options).OnlyEnforceIf(self.present[v, i])
        recompute = [self.present[node, i] * self.costs[node] for (node, i) in self.present if i > 0]
        self.cost = sum(recompute) if recompute else 0
        if minimize_budget:
            model.Minimize(self.capacity)
        else:
            model.Minimize(self.cost)

    def hint(self, intervals: dict) -> None:
        for node in self.order:
            spans = intervals[node]
            for i in range(self.copies[node]):
                if i < len(spans):
                    start, end = spans[i]
                    if i:
                        self.model.AddHint(self.present[node, i], 1)
                        self.model.AddHint(self.starts[node, i], start)
                    self.model.AddHint(self.ends[node, i], end)
                elif i:
                    self.model.AddHint(self.present[node, i], 0)

    def intervals(self, solver: cp_model.CpSolver) -> dict:
        found = {}
        for node in self.order:
            spans = []
            for i in range(self.copies[node]):
                if solver.Value(self.present[node, i]):
                    spans.append((solver.Value(self.starts[node, i]), solver.Value(self.ends[node, i])))
            found[node] = spans
        return found


class _Progress(cp_model.CpSolverSolutionCallback):
    """Records (seconds since the solve started, objective) for every improving solution."""

    def __init__(self, started: float, scale: float):
        super().__init__()
        self.started, self.scale, self.trace = started, scale, []

    def on_solution_callback(self):
        self.trace.append((time.perf_counter() - self.started, self.ObjectiveValue() / self.scale))


def _solver(time_limit: float, workers: int, seed: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, time_limit)
    solver.parameters.num_search_workers = workers
    solver.parameters.random_seed = seed
    return solver


def lower_bound_budget(graph: nx.DiGraph, order: list, keep=()) -> int:
    """No schedule fits below this: computing a node needs it and all its inputs at once,
    and ``keep`` nodes all stay to the end."""
    needed = [graph.nodes[v]["mem"] + sum(graph.nodes[u]["mem"] for u in graph.predecessors(v)) for v in order]
    return max(max(needed, default=0), sum(graph.nodes[v]["mem"] for v in keep))


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
) -> Schedule:
    """The cheapest schedule within ``budget`` found in ``time_limit`` seconds.

    ``keep``: nodes that must stay in memory to the end (the graph's outputs). When the budget
    is infeasible the result says so and, with ``find_smallest_budget``, carries the smallest
    budget a schedule was found for (``smallest_feasible_budget``), searched in the time left.
    """
    check_problem(graph, order, budget)
    if intervals_per_node < 1:
        raise ScheduleError("intervals_per_node must be at least 1")
    keep = set(keep)
    started = time.perf_counter()
    baseline = no_remat_intervals(graph, order, keep)
    if peak_memory(graph, order, baseline) <= budget:
        # Phase one is free: the plain schedule fits and costs nothing, which is optimal.
        return Schedule("optimal", 0.0, 0.0, baseline, time.perf_counter() - started, "moccasin", budget,
                        peak_memory(graph, order, baseline))  # fmt: skip
    if budget < lower_bound_budget(graph, order, keep):
        result = Schedule("infeasible", solver="moccasin", budget=budget)
        if find_smallest_budget:
            result.smallest_feasible_budget = _smallest_budget(
                graph, order, intervals_per_node, keep, time_limit, workers, seed
            )
        result.seconds = time.perf_counter() - started
        return result

    # Phase one: any schedule within the budget, greedily if that finds one, else by CP-SAT.
    first = greedy_schedule(graph, order, budget, intervals_per_node, keep)
    if first is None:
        feasible = _Model(graph, order, budget, intervals_per_node, keep)
        feasible.model.ClearObjective()
        feasible.hint(baseline)  # over budget, but a start close to schedules that fit
        # Most of the time goes to finding a first schedule: without one there is nothing to
        # improve; once found, the rest improves it.
        solver = _solver(time_limit * 0.8, workers, seed)
        status = solver.Solve(feasible.model)
    else:
        status = cp_model.FEASIBLE
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        result = Schedule(_STATUS.get(status, "unknown"), solver="moccasin", budget=budget)
        if status == cp_model.INFEASIBLE and find_smallest_budget:
            left = time_limit - (time.perf_counter() - started)
            result.smallest_feasible_budget = _smallest_budget(graph, order, intervals_per_node, keep, left, workers, seed)
        result.seconds = time.perf_counter() - started
        return result
    if first is None:
        first = feasible.intervals(solver)

    # Phase two: the cheapest schedule, starting from the first one.
    cheapest = _Model(graph, order, budget, intervals_per_node, keep)
    cheapest.hint(first)
    left = time_limit - (time.perf_counter() - started)
    solver = _solver(left, workers, seed)
    progress = _Progress(started, cheapest.scale)
    status = solver.Solve(cheapest.model, progress)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        intervals = cheapest.intervals(solver)
        objective = solver.ObjectiveValue() / cheapest.scale
        bound = solver.BestObjectiveBound() / cheapest.scale
        label = _STATUS[status]
    else:  # time ran out in phase two: the phase-one schedule stands, its cost unproven
        intervals = first
        objective = _cost(graph, first)
        bound = 0.0
        label = "feasible"
    result = Schedule(label, objective, bound, intervals, time.perf_counter() - started, "moccasin", budget,
                      peak_memory(graph, order, intervals))  # fmt: skip
    result.trace = [(seconds, value) for seconds, value in progress.trace]
    return result


def greedy_schedule(graph: nx.DiGraph, order: list, budget: int, intervals_per_node: int = 2, keep=()):
    """A quick schedule within ``budget``, or None: starting from the plain schedule, at the
    first time over budget, drop the tensor with the most memory per unit of recomputation
    cost that is not read then and whose inputs are alive at its next use, and recompute it
    there. Used to start the search (CP-SAT alone can take minutes to find a first schedule
    on graphs of a thousand nodes)."""
    intervals = {node: list(spans) for node, spans in no_remat_intervals(graph, order, keep).items()}
    def reads(node) -> list[int]:
        """Every time ``node`` is read: its users' computations and recomputations."""
        return sorted(start for u in graph.successors(node) for start, _ in intervals[u])

    def alive(node, t):
        return any(s <= t <= e for s, e in intervals[node])

    for _ in range(len(order) * intervals_per_node):
        profile = memory_profile(graph, order, intervals)
        over = [t for t, used in enumerate(profile) if used > budget]
        if not over:
            return intervals
        t = over[0]
        needed_now = {order[t], *graph.predecessors(order[t])}
        best, best_score = None, None
        for node in order[:t]:
            spans = intervals[node]
            if node in needed_now or node in keep or len(spans) >= intervals_per_node:
                continue
            covering = [k for k, (s, e) in enumerate(spans) if s <= t <= e]
            if not covering:
                continue
            k = covering[0]
            start, end = spans[k]
            needed = reads(node)
            before = [u for u in needed if start <= u < t]
            after = [u for u in needed if t < u <= end]
            if not after:
                continue
            cut, resume = (before[-1] if before else start), after[0]
            if resume < cut + 2 or not all(alive(p, resume) for p in graph.predecessors(node)):
                continue
            score = graph.nodes[node]["mem"] / (1.0 + graph.nodes[node]["cost"])
            if best_score is None or score > best_score:
                best, best_score = (node, k, cut, resume, end), score
        if best is None:
            return None
        node, k, cut, resume, end = best
        intervals[node][k : k + 1] = [(intervals[node][k][0], cut), (resume, end)]
    return None


def _cost(graph, intervals) -> float:
    return float(sum(graph.nodes[n]["cost"] * (len(spans) - 1) for n, spans in intervals.items()))


def _smallest_budget(graph, order, intervals_per_node, keep, time_limit, workers, seed) -> int | None:
    """The smallest capacity a schedule with this many intervals per node fits in (the best
    found within the time limit: an upper bound on the true smallest)."""
    model = _Model(graph, order, 0, intervals_per_node, keep, minimize_budget=True)
    solver = _solver(max(time_limit, 1.0), workers, seed)
    status = solver.Solve(model.model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return int(math.ceil(solver.Value(model.capacity)))
    return None
