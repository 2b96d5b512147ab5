"""Rematerialization schedules over a fixed order, and what the solvers share.

A problem is a networkx DiGraph whose nodes carry ``mem`` (bytes of the node's output) and
``cost`` (what computing it once costs), a topological ``order`` and a memory ``budget``.
Time is the position in the order: at time t node ``order[t]`` is computed, after any
recomputations placed at t. A schedule gives each node its retention intervals
``[start, end]`` (inclusive): the first starts at the node's own position; every later one
is a recomputation at its start time. The memory at time t is the sum of ``mem`` over the
intervals covering t.

A node may also carry ``recompute``: when it is False the node is computed exactly once (it
has one interval), as random ops such as dropout must be; a node without the attribute may be
recomputed.

A schedule is valid when every computation (first or recomputation) of a node finds each of
its inputs in some interval covering that time, no node with ``recompute=False`` is
recomputed, and the memory never exceeds the budget; ``validate`` checks all three and
``peak_memory`` gives the simulated peak.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import networkx as nx


class ScheduleError(ValueError):
    """A schedule or problem that breaks the rules above; the message says where."""


@dataclass
class Schedule:
    """A solver's answer.

    status: "optimal" (proved), "feasible" (the best found in the time limit; ``bound`` is the
    best proved lower bound of the objective), "infeasible" (no schedule fits the budget) or
    "unknown" (the time limit ran out before any schedule was found).
    objective: total cost of the recomputations (0 when nothing is recomputed).
    intervals: node -> list of (start, end) positions, the first starting at the node's own.
    trace: (seconds, objective) of the first schedule and of every improving one after it.
    """

    status: str
    objective: float | None = None
    bound: float | None = None
    intervals: dict = field(default_factory=dict)
    seconds: float = 0.0
    solver: str = ""
    budget: int = 0
    peak: int | None = None
    smallest_feasible_budget: int | None = None
    smallest_intervals: dict | None = None  # a schedule that fits smallest_feasible_budget
    trace: list = field(default_factory=list)
    # the schedule phase two began from: "plain", "local search", "cp-sat" or a start's name;
    # or the late start (``moccasin.solve``'s ``late_starts``) the result is, where it beat phase two
    phase_one: str = ""
    seconds_to_first: float | None = None  # when the first schedule within the budget was found
    # why the search stopped: "optimal", "gap", "stalled", "time_limit" or "infeasible"
    stopped: str = ""
    start_costs: dict = field(default_factory=dict)  # cost of each schedule phase two could begin from
    plan_cache: str = ""  # set by a caller that caches plans: "hit", "miss" or "off"
    intervals_per_node: int | None = None  # set by a caller that tries several

    @property
    def seconds_to_best(self) -> float | None:
        """When the final objective was first reached (None without a trace)."""
        if not self.trace or self.objective is None:
            return None
        return next(s for s, value in self.trace if value <= self.objective + 1e-9)

    @property
    def recomputations(self) -> list[tuple[int, object]]:
        """(time, node) of every recomputation, in time order."""
        found = [(start, node) for node, spans in self.intervals.items() for start, _ in spans[1:]]
        return sorted(found, key=lambda item: item[0])

    @property
    def has_schedule(self) -> bool:
        return self.status in ("optimal", "feasible")


def check_problem(graph: nx.DiGraph, order: list, budget: int) -> dict:
    """Positions of the nodes; raises ScheduleError for a bad order or missing attributes."""
    if set(order) != set(graph.nodes) or len(order) != graph.number_of_nodes():
        raise ScheduleError("the order must list every node of the graph exactly once")
    position = {node: t for t, node in enumerate(order)}
    for u, v in graph.edges:
        if position[u] >= position[v]:
            raise ScheduleError(f"the order is not topological: {u!r} comes after its user {v!r}")
    for node, data in graph.nodes(data=True):
        for key in ("mem", "cost"):
            if key not in data:
                raise ScheduleError(f"node {node!r} has no {key!r} attribute")
            if data[key] < 0:
                raise ScheduleError(f"node {node!r} has a negative {key!r}")
    if budget < 0:
        raise ScheduleError("the budget must not be negative")
    return position


def recomputable(graph: nx.DiGraph, node) -> bool:
    """Whether ``node`` may be computed more than once (its ``recompute`` attribute)."""
    return bool(graph.nodes[node].get("recompute", True))


def no_remat_intervals(graph: nx.DiGraph, order: list, keep=()) -> dict:
    """Each node kept from its computation to its last use (or the end, for ``keep``)."""
    position = {node: t for t, node in enumerate(order)}
    last = len(order) - 1
    intervals = {}
    for node in order:
        users = [position[u] for u in graph.successors(node)]
        end = last if node in keep else max(users, default=position[node])
        intervals[node] = [(position[node], end)]
    return intervals


def memory_profile(graph: nx.DiGraph, order: list, intervals: dict) -> list[int]:
    """Memory in use at each time step."""
    profile = [0] * len(order)
    for node, spans in intervals.items():
        mem = graph.nodes[node]["mem"]
        for start, end in spans:
            for t in range(start, end + 1):
                profile[t] += mem
    return profile


def peak_memory(graph: nx.DiGraph, order: list, intervals: dict) -> int:
    return max(memory_profile(graph, order, intervals), default=0)


def recompute_cost(graph: nx.DiGraph, intervals: dict) -> float:
    return sum(graph.nodes[node]["cost"] * (len(spans) - 1) for node, spans in intervals.items())


def validate(graph: nx.DiGraph, order: list, intervals: dict, budget: int | None = None, keep=()) -> None:
    """Raise ScheduleError unless every computation finds its inputs alive, every use of a
    node's output finds it alive, nodes with ``recompute=False`` are computed once, ``keep``
    nodes last to the end, and the memory stays within ``budget`` (when given)."""
    position = check_problem(graph, order, budget or 0)
    last = len(order) - 1

    def alive(node, t) -> bool:
        return any(start <= t <= end for start, end in intervals.get(node, []))

    for node in order:
        spans = intervals.get(node)
        if not spans:
            raise ScheduleError(f"node {node!r} has no interval")
        if spans[0][0] != position[node]:
            raise ScheduleError(f"node {node!r}: its first interval must start at its position {position[node]}")
        if len(spans) > 1 and not recomputable(graph, node):
            raise ScheduleError(f"node {node!r} has recompute=False but is recomputed at time {spans[1][0]}")
        for k, (start, end) in enumerate(spans):
            if not 0 <= start <= end <= last:
                raise ScheduleError(f"node {node!r}: interval {k} [{start}, {end}] is out of range")
            if k and start <= spans[k - 1][1]:
                raise ScheduleError(f"node {node!r}: interval {k} overlaps or precedes the one before it")
            for parent in graph.predecessors(node):
                if not alive(parent, start):
                    raise ScheduleError(f"computing {node!r} at time {start} needs {parent!r}, which is not kept then")
        if node in keep and not alive(node, last):
            raise ScheduleError(f"node {node!r} must be kept to the end")
    if budget is not None:
        profile = memory_profile(graph, order, intervals)
        for t, used in enumerate(profile):
            if used > budget:
                raise ScheduleError(f"memory {used} at time {t} exceeds the budget {budget}")


def random_layered_graph(
    nodes: int, seed: int = 0, width: int = 8, fan_in: int = 3, skip: float = 0.2, edges: int | None = None
) -> tuple[nx.DiGraph, list]:
    """A random layered DAG like the RL benchmarks of the Checkmate and Moccasin papers:
    ``nodes`` nodes in layers of up to ``width``; each node reads 1 to ``fan_in`` nodes, each
    from the previous layer or, with probability ``skip``, from any earlier layer (the long
    edges that make keeping versus recomputing a real choice); sizes and costs are random
    integers in 1..10. With ``edges``, random nodes then read further nodes, drawn the same
    way, until the graph has that many edges (the papers' graphs are denser than ``fan_in``
    alone gives). Returns the graph and its topological order (layer by layer)."""
    rng = random.Random(seed)
    graph = nx.DiGraph()
    layers: list[list[int]] = []
    layer_of: dict[int, int] = {}
    index = 0

    def draw_input(layer: int) -> int:
        source = rng.choice(layers[: layer - 1]) if layer > 1 and rng.random() < skip else layers[layer - 1]
        return rng.choice(source)

    while index < nodes:
        size = min(rng.randint(max(1, width // 2), width), nodes - index)
        layer = list(range(index, index + size))
        for node in layer:
            graph.add_node(node, mem=rng.randint(1, 10), cost=rng.randint(1, 10))
            layer_of[node] = len(layers)
            if not layers:
                continue
            for _ in range(rng.randint(1, fan_in)):
                graph.add_edge(draw_input(len(layers)), node)
        layers.append(layer)
        index += size
    if edges is not None:
        def sources(k: int) -> int:  # how many nodes draw_input can give a node of layer k
            if k < 2:
                return len(layers[0]) if k else 0
            return (len(layers[k - 1]) if skip < 1 else 0) + (sum(map(len, layers[: k - 1])) if skip > 0 else 0)

        possible = sum(len(layer) * sources(k) for k, layer in enumerate(layers))
        if edges > possible:
            raise ValueError(f"{nodes} nodes in these layers allow at most {possible} edges, not {edges}")
        readers = [node for node in range(nodes) if layer_of[node] > 0]
        while graph.number_of_edges() < edges:
            node = rng.choice(readers)
            graph.add_edge(draw_input(layer_of[node]), node)
    return graph, list(range(nodes))
