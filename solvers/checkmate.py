"""The Checkmate MILP (Jain et al., MLSys 2020): the baseline Moccasin is compared with.

Frontier-advancing stages over the same fixed order: stage t computes node t and may
recompute earlier nodes first. Booleans, all O(n^2):

- ``R[t, i]``: node i is computed in stage t (``R[t, t] = 1``);
- ``S[t, i]``: node i is kept in memory from stage t-1 into stage t (``S[0, .] = 0``);
- ``FREE[t, i, k]`` for each edge (i, k) and each stage: i is freed right after k is computed
  in stage t, because k is its last user computed in the stage and i is not kept into t+1.

Constraints: a computation needs its inputs computed or kept in the same stage
(``R[t, k] <= R[t, i] + S[t, i]``), a kept node was kept or computed in the stage before
(``S[t+1, i] <= S[t, i] + R[t, i]``), and the memory after each computation in each stage,
``U[t, k] = U[t, k-1] + mem_k R[t, k] - sum_i mem_i FREE[t, i, k]``, stays within the budget.
The objective is the cost of all computations beyond the first of each node. A node with
``recompute=False`` is computed in its own stage only (``R[t, i] = 0`` for t > i). Solved with
OR-Tools' MILP interface (SCIP by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import networkx as nx
from ortools.linear_solver import pywraplp

from solvers.schedule import ScheduleError, check_problem, recomputable

_STATUS = {
    pywraplp.Solver.OPTIMAL: "optimal",
    pywraplp.Solver.FEASIBLE: "feasible",
    pywraplp.Solver.INFEASIBLE: "infeasible",
    pywraplp.Solver.NOT_SOLVED: "unknown",
}


@dataclass
class StageSchedule:
    """The MILP's answer: ``compute[t]`` the nodes computed in stage t (in order, the last one
    being node t), ``keep[t]`` the nodes kept into stage t; status/objective/bound as in
    ``solvers.schedule.Schedule``."""

    status: str
    objective: float | None = None
    bound: float | None = None
    compute: list | None = None
    keep: list | None = None
    seconds: float = 0.0
    solver: str = "checkmate"
    budget: int = 0
    peak: int | None = None

    @property
    def has_schedule(self) -> bool:
        return self.status in ("optimal", "feasible")


def stage_memory(graph: nx.DiGraph, order: list, compute: list, keep: list) -> list[int]:
    """Memory after each computation of each stage, counted as the MILP counts it (a node is
    freed right after its last user computed in the stage, unless kept into the next stage);
    raises ScheduleError when a computation misses an input, a kept node was not there, or a
    node with ``recompute=False`` is recomputed."""
    n = len(order)
    profile = []
    for t in range(n):
        computed = list(compute[t])
        if not computed or computed[-1] != order[t]:
            raise ScheduleError(f"stage {t} must end by computing {order[t]!r}")
        for node in computed[:-1]:
            if not recomputable(graph, node):
                raise ScheduleError(f"node {node!r} has recompute=False but is recomputed in stage {t}")
        kept_out = set(keep[t + 1]) if t + 1 < n else set()
        for node in keep[t]:
            if t == 0 or (node not in keep[t - 1] and node not in compute[t - 1]):
                raise ScheduleError(f"{node!r} is kept into stage {t} but was not in memory at the end of stage {t - 1}")
        available = set(keep[t])
        used = sum(graph.nodes[v]["mem"] for v in keep[t])
        for k, node in enumerate(computed):
            missing = [p for p in graph.predecessors(node) if p not in available]
            if missing:
                raise ScheduleError(f"stage {t}: computing {node!r} needs {missing[0]!r}, which is not in memory")
            available.add(node)
            used += graph.nodes[node]["mem"]
            profile.append(used)
            later = set(computed[k + 1 :])
            for parent in graph.predecessors(node):
                if parent not in kept_out and not later & set(graph.successors(parent)):
                    used -= graph.nodes[parent]["mem"]
    return profile


def solve(
    graph: nx.DiGraph,
    order: list,
    budget: int,
    *,
    time_limit: float = 60.0,
    backend: str = "SCIP",
    threads: int = 1,
) -> StageSchedule:
    """The cheapest stage schedule within ``budget`` found in ``time_limit`` seconds."""
    check_problem(graph, order, budget)
    started = time.perf_counter()
    n = len(order)
    index = {node: t for t, node in enumerate(order)}
    mem = [graph.nodes[v]["mem"] for v in order]
    cost = [graph.nodes[v]["cost"] for v in order]
    parents = [[index[u] for u in graph.predecessors(v)] for v in order]
    users = [sorted(index[u] for u in graph.successors(v)) for v in order]
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise ScheduleError(f"the MILP backend {backend!r} is not available in this OR-Tools build")
    solver.SetTimeLimit(int(time_limit * 1000))
    solver.SetNumThreads(threads)
    once = [not recomputable(graph, v) for v in order]
    R = {(t, i): solver.IntVar(0, 0 if once[i] and i < t else 1, f"R_{t}_{i}") for t in range(n) for i in range(t + 1)}
    S = {(t, i): solver.BoolVar(f"S_{t}_{i}") for t in range(1, n) for i in range(t)}
    for t in range(n):
        solver.Add(R[t, t] == 1)
        for k in range(t + 1):
            for i in parents[k]:
                solver.Add(R[t, k] <= R[t, i] + (S[t, i] if t > 0 and i < t else 0))
        if t + 1 < n:
            for i in range(t + 1):
                solver.Add(S[t + 1, i] <= (S[t, i] if i < t else 0) + R[t, i])
    free = {}
    for t in range(n):
        for k in range(t + 1):
            for i in parents[k]:
                later = [j for j in users[i] if k < j <= t]
                hazards = (1 - R[t, k]) + (S[t + 1, i] if t + 1 < n else 0) + sum(R[t, j] for j in later)
                var = solver.BoolVar(f"F_{t}_{i}_{k}")
                bound = 2 + len(later)
                solver.Add(1 - var <= hazards)
                solver.Add(bound * (1 - var) >= hazards)
                free[t, i, k] = var
    for t in range(n):
        used = sum(S[t, i] * mem[i] for i in range(t)) if t > 0 else 0
        for k in range(t + 1):
            used = used + R[t, k] * mem[k]
            solver.Add(used <= budget)
            used = used - sum(free[t, i, k] * mem[i] for i in parents[k])
    solver.Minimize(sum(R[key] * cost[key[1]] for key in R) - sum(cost))
    status = solver.Solve()
    label = _STATUS.get(status, "unknown")
    result = StageSchedule(label, seconds=time.perf_counter() - started, budget=budget)
    if label in ("optimal", "feasible"):
        result.objective = solver.Objective().Value()
        result.bound = solver.Objective().BestBound()  # the objective's constant included, as in Value()
        result.compute = [[order[i] for i in range(t + 1) if R[t, i].solution_value() > 0.5] for t in range(n)]
        result.keep = [[order[i] for i in range(t) if S[t, i].solution_value() > 0.5] if t else [] for t in range(n)]
        result.peak = max(stage_memory(graph, order, result.compute, result.keep), default=0)
    return result
