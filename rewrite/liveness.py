"""Liveness of a graph's tensors and the per-storage memory model the schedule solvers take.

A *storage node* is a call_function node that allocates: aliases (views, ``getitem`` of a
multi-output op, ``_unsafe_view``) own no memory and keep their base alive. Inputs
(parameters, buffers, the model's inputs) are alive throughout and not counted; the
incoming gradients of a joint forward+backward graph (``tangents_*``) are storages from
their first use. The memory at a point of the order is the bytes of the storage nodes alive
there; a node is alive from its computation to its last use, outputs (the model's outputs
and the gradients) to the end. ``rewrite.memory.measure_peak`` measures the same quantity for
real: the peak bytes of the storages allocated while a function runs and still alive. The
*activation memory* (``activation_profile``) leaves out the gradients a joint graph returns
(``gradient_units``), which no recomputation lowers.

``MemoryModel`` gives each storage its bytes, the cost of computing it again (by one of
``rewrite.cost_models.COST_MODELS``) and whether it may be recomputed: random ops
(``nondeterministic_seeded``) never are, since a second draw would differ, nor ops that read
an input the step updates in place.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from rewrite.cost_models import COST_MODELS, DEFAULT_COST, op_costs
from rewrite.graph import node_bytes, tensor_bytes
from rewrite.node_kinds import is_alias, is_random, is_split, is_training_batch_norm


@dataclass
class Unit:
    """One storage the step allocates: the output of ``node``, or output ``index`` of a
    multi-output node (then ``name`` is the name of the getitem that takes it)."""

    name: str
    node: fx.Node
    index: int | None = None


@dataclass
class MemoryModel:
    """A graph's storages in order with bytes, cost and what they read (through aliases).

    ``graph`` is the solvers' problem: a DiGraph over unit names with ``mem``, ``cost`` and
    ``recompute``; ``order`` its topological order; ``keep`` the units that must last to the
    end. The outputs of a multi-output op are separate units at consecutive positions, the
    largest first: they die separately, and recomputing any of them reruns the op.
    """

    fx_graph: fx.Graph
    units: list[Unit]
    graph: nx.DiGraph
    order: list[str]
    keep: set[str]
    root: dict[fx.Node, str | None]  # node -> name of the unit it lives in (None: an input)
    flops: dict[str, int] = field(default_factory=dict)  # per op (the first unit of an op)

    @classmethod
    def from_graph(
        cls, fx_graph: fx.Graph, mutable_inputs: frozenset[str] = frozenset(), cost: str | None = DEFAULT_COST
    ) -> MemoryModel:
        """``mutable_inputs``: placeholders the step may update in place (buffers such as
        batch-norm statistics); an op that reads one is never recomputed, since by the
        backward the input holds its new value. ``cost``: one of ``COST_MODELS`` (see
        ``rewrite.cost_models``), or None to leave every cost 0 (for memory alone: counting FLOPs
        runs each op on fake tensors)."""
        if cost is not None and cost not in COST_MODELS:
            raise ValueError(f"cost model {cost!r}: choose one of {', '.join(COST_MODELS)}")
        root: dict[fx.Node, str | None] = {}
        units: list[Unit] = []
        # The gradients coming into the backward are made contiguous inside the step (a
        # scalar loss's is an expanded scalar outside it): a storage from their first use on.
        pending = {n for n in fx_graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")}
        for node in fx_graph.nodes:
            for a in node.all_input_nodes:
                if a in pending:
                    pending.discard(a)
                    units.append(Unit(a.name, a))
            if node.op == "placeholder" and node.name.startswith("tangents"):
                root[node] = node.name
            elif node.op in ("placeholder", "get_attr", "output"):
                root[node] = None
            elif node.target is operator.getitem and is_split(node.args[0]):
                root[node] = node.name  # a unit of its own, added with its op below
            elif is_alias(node):
                base = node.args[0]
                root[node] = root.get(base) if isinstance(base, fx.Node) else None
            elif is_split(node):
                root[node] = None
                parts = [u for u in node.users if u.target is operator.getitem]
                parts.sort(key=lambda g: -node_bytes(g))
                units.extend(Unit(g.name, node, g.args[1]) for g in parts)
            else:
                root[node] = node.name
                units.append(Unit(node.name, node))
        graph = nx.DiGraph()
        flops, op_cost = op_costs((u.node for u in units if u.node.op != "placeholder"), cost)
        for unit in units:
            node = unit.node
            if node.op == "placeholder":
                graph.add_node(unit.name, mem=node_bytes(node), cost=0, recompute=False)
                continue
            mem = node_bytes(next(g for g in node.users if g.name == unit.name)) if unit.index is not None else node_bytes(node)
            graph.add_node(unit.name, mem=mem, cost=op_cost[node], recompute=_recomputable(unit, mutable_inputs))
        for unit in units:
            for a in unit.node.all_input_nodes:
                base = root.get(a)
                if base is not None and base != unit.name:
                    graph.add_edge(base, unit.name)
        output = next(n for n in fx_graph.nodes if n.op == "output")
        keep = {root[a] for a in output.all_input_nodes if root.get(a) is not None}
        return cls(fx_graph, units, graph, [u.name for u in units], keep, root, flops)

    def gradient_units(self) -> set[str]:
        """The units the step returns that are computed from the incoming gradients
        (``tangents_*``): the gradients of a joint forward+backward graph's parameters and
        inputs, alive from where the backward makes them to the end. None in a forward graph."""
        return gradient_units(self.fx_graph, self.root)

    def activation_graph(self) -> nx.DiGraph:
        """``graph`` with the gradients' ``mem`` 0: a schedule within a budget over it bounds
        the activation memory (what is saved for the backward and the temporaries of both
        passes), which recomputation can lower, leaving out the gradients, which it cannot."""
        gradients = self.gradient_units()
        if not gradients:
            return self.graph
        graph = self.graph.copy()
        for name in gradients:
            graph.nodes[name]["mem"] = 0
        return graph

    def plain_intervals(self) -> dict:
        """Every unit kept from its computation to its last use: the step as written."""
        from solvers.schedule import no_remat_intervals

        return no_remat_intervals(self.graph, self.order, self.keep)

    def profile(self, intervals: dict) -> list[int]:
        from solvers.schedule import memory_profile

        return memory_profile(self.graph, self.order, intervals)

    def total_flops(self) -> int:
        return sum(self.flops.values())

    def total_cost(self) -> float:
        """The cost of running every op once (an op with several outputs counts once)."""
        ops = {u.node: self.graph.nodes[u.name]["cost"] for u in self.units}
        return sum(ops.values())


def _recomputable(unit: Unit, mutable_inputs: frozenset[str]) -> bool:
    node = unit.node
    if is_random(node):
        return False
    if is_training_batch_norm(node):
        # Its output and batch statistics (outputs 0-2) do not depend on the running
        # statistics, which the step updates in place: a recomputation runs the op without
        # them (``_native_batch_norm_legit.no_stats``). The updated statistics themselves are
        # not recomputed.
        return unit.index is not None and unit.index < 3
    return not _reads_any(node, mutable_inputs)


def _reads_any(node: fx.Node, placeholders: frozenset[str]) -> bool:
    """Whether ``node`` reads one of ``placeholders`` directly or through views."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        if a.op == "placeholder" and a.name in placeholders:
            return True
        if is_alias(a):
            stack.extend(a.all_input_nodes)
    return False


def gradient_units(graph: fx.Graph, root: dict[fx.Node, str | None]) -> set[str]:
    """The units (``root``: node -> unit name, as ``MemoryModel.root``) of ``graph``'s outputs
    that depend on an incoming gradient (a ``tangents_*`` placeholder): in a joint graph, the
    outputs after its forward outputs, which never read one."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
            a in backward for a in node.all_input_nodes
        ):
            backward.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    return {root[a] for a in output.all_input_nodes if a in backward and root.get(a) is not None}


def activation_profile(graph: fx.Graph) -> list[int]:
    """``liveness_profile`` without the gradients the step returns (``gradient_units``): the
    activation memory, the quantity ``remat{of=activations}`` bounds. For a forward graph,
    the same as ``liveness_profile``."""
    return liveness_profile(graph, gradients=False)


def liveness_profile(graph: fx.Graph, gradients: bool = True) -> list[int]:
    """Bytes of storage alive while each node of ``graph`` runs, each freed after its last
    use (as fx's generated code and the Interpreter free them); outputs stay to the end. An
    op's outputs are all allocated when it runs, and the tuple of a multi-output op holds
    every output until the op's last ``getitem`` has run (outputs nobody takes included).
    ``gradients=False`` leaves out the gradients a joint graph returns (``gradient_units``)."""
    model = MemoryModel.from_graph(graph, cost=None)
    left_out = set() if gradients else model.gradient_units()
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use: dict[str, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            base = model.root.get(a)
            if base is not None:
                last_use[base] = max(last_use.get(base, 0), index[n])
    end = len(nodes) - 1
    for name in model.keep:
        last_use[name] = end
    first_use = {}
    for n in nodes:
        for a in n.all_input_nodes:
            first_use.setdefault(a, index[n])
    tuple_end = {n: max(index[u] for u in n.users) for n in nodes if is_split(n)}
    delta = [0] * (len(nodes) + 1)

    def alive(mem: int, born: int, dies: int) -> None:
        delta[born] += mem
        delta[max(dies, born) + 1] -= mem

    taken: dict[fx.Node, set[int]] = {}
    for unit in model.units:
        mem = 0 if unit.name in left_out else model.graph.nodes[unit.name]["mem"]
        node = unit.node
        born = first_use.get(node, index[node]) if node.op == "placeholder" else index[node]
        dies = last_use.get(unit.name, born)
        if unit.index is not None:
            dies = max(dies, tuple_end[node])
            taken.setdefault(node, set()).add(unit.index)
        alive(mem, born, dies)
    for node, end_of_tuple in tuple_end.items():
        for i, value in enumerate(node.meta["val"]):
            if i not in taken.get(node, ()) and isinstance(value, torch.Tensor):
                alive(tensor_bytes(value), index[node], end_of_tuple)
    profile, running = [], 0
    for i in range(len(nodes)):
        running += delta[i]
        profile.append(running)
    return profile
