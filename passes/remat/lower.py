"""remat's lowering: a schedule written out as graphs, and the training step split on it.

``realize`` writes a graph out in its memory model's order with a copy of a node at every
recomputation the schedule (retention intervals over the order, ``solvers.schedule``
semantics) asks for. For training, ``ScheduledTraining`` gives the joint forward+backward
graph AOTAutograd traces (``rewrite.training_step``) to ``partition``: it turns the graph into
a ``MemoryModel``, asks a *planner* for the schedule, realizes it and splits it where the
forward ends. Whatever is alive across that point is saved; everything else is freed after
its last use and recomputed where the schedule says.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from rewrite.cost_models import DEFAULT_COST
from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.node_kinds import is_mutating, is_split, is_training_batch_norm
from rewrite.training_step import TrainingStep

aten = torch.ops.aten


def _recomputation(node: fx.Node, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict, Any]:
    """The op, arguments and keyword arguments that recompute ``node``'s outputs, and the
    value (``meta["val"]``) the recomputation traces to."""
    val = node.meta.get("val")
    if is_training_batch_norm(node):
        # without the running statistics (updated once, by the first computation): the
        # output, mean and inverse std, as the functional op's first three outputs
        x, weight, bias, _mean, _var, training, momentum, eps = args
        return aten._native_batch_norm_legit.no_stats, (x, weight, bias, training, momentum, eps), kwargs, val[:3]
    return node.target, args, kwargs, val


def realize(model: MemoryModel, intervals: dict) -> tuple[fx.Graph, dict[fx.Node, int]]:
    """``model``'s graph written out in order with a copy of an op at each recomputation.

    Returns the new graph and the time (position in the order) each new node runs at; a
    node's inputs are the copies the schedule keeps alive at that time, and aliases are
    re-taken from the copy of their base alive there.
    """
    old = model.fx_graph
    new = fx.Graph()
    when: dict[fx.Node, int] = {}
    mapped: dict[fx.Node, fx.Node] = {}
    for node in old.nodes:
        if node.op in ("placeholder", "get_attr"):
            mapped[node] = new.node_copy(node)
            when[mapped[node]] = -1
    position = {name: t for t, name in enumerate(model.order)}
    units = {u.name: u for u in model.units}
    getitems = {n.name: n for n in old.nodes if n.target is operator.getitem}
    copies: dict[str, list[tuple[int, int, fx.Node]]] = {name: [] for name in model.order}
    aliases: dict[tuple[fx.Node, fx.Node | None], fx.Node] = {}

    def storage_copy(name: str, t: int) -> fx.Node:
        for start, end, copy in copies[name]:
            if start <= t <= end:
                return copy
        raise ValueError(f"schedule error: {name} is needed at time {t} but not kept then")

    def value(arg: fx.Node, t: int) -> fx.Node:
        if arg in mapped:
            return mapped[arg]
        base = model.root.get(arg)
        if base == arg.name and base in copies:
            return storage_copy(base, t)
        holder = storage_copy(base, t) if base is not None else None
        key = (arg, holder)
        if key not in aliases:
            aliases[key] = emit(arg, t, arg.name)
        return aliases[key]

    def emit(node: fx.Node, t: int, name: str, again: bool = False) -> fx.Node:
        args = fx.node.map_arg(node.args, lambda a: value(a, t))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: value(a, t))
        target, val = node.target, node.meta.get("val")
        if again:
            target, args, kwargs, val = _recomputation(node, args, kwargs)
        copy = new.create_node(node.op, target, args, kwargs, name=name)
        copy.meta = dict(node.meta)
        if val is not None:
            copy.meta["val"] = val
        when[copy] = t
        return copy

    # One op copy per first computation and per recomputation time; the outputs of a
    # multi-output op it serves are taken right after it, so the tuple dies at once and each
    # output lives as long as its own uses (as the memory model has it).
    events: dict[tuple[fx.Node, object], list[tuple[int, int, int, int]]] = {}
    for name, spans in intervals.items():
        unit = units[name]
        for k, (start, end) in enumerate(spans):
            events.setdefault((unit.node, "first" if k == 0 else start), []).append((start, position[name], k, end))
    # at a time, recomputations run before the node of that time (k > 0 sorts first)
    schedule = sorted(events.items(), key=lambda item: min((s, 0 if k else 1, p) for s, p, k, _ in item[1]))
    for (node, _), served in schedule:
        start, _, k, _ = min(served)
        if node.op == "placeholder":  # an incoming gradient: there from its first use
            for s, pos, _, end in served:
                copies[model.order[pos]].append((s, end, mapped[node]))
            continue
        copy = emit(node, start, node.name if k == 0 else f"{node.name}_recomputed", again=k > 0)
        if k:
            copy.meta["recomputed"] = True
        for s, pos, _, end in sorted(served, key=lambda e: e[1]):
            unit = units[model.order[pos]]
            held = copy
            if unit.index is not None:
                name = unit.name if k == 0 else f"{unit.name}_recomputed"
                held = new.create_node("call_function", operator.getitem, (copy, unit.index), name=name)
                held.meta = dict(getitems[unit.name].meta)
                when[held] = start
            copies[unit.name].append((s, end, held))
    last = len(model.order) - 1
    output = next(n for n in old.nodes if n.op == "output")
    out = new.output(fx.node.map_arg(output.args[0], lambda a: value(a, last)))
    out.meta = dict(output.meta)
    new._codegen = old._codegen
    new.lint()
    return new, when


@dataclass
class Partition:
    """What one partition produced: the memory model, the schedule and the realized graphs."""

    model: MemoryModel
    intervals: dict
    joint: fx.Graph  # realized, before the split
    forward: fx.GraphModule
    backward: fx.GraphModule
    saved: list[str]
    simulated_peak: int  # bytes: peak of the realized step, freeing after last use
    plain_peak: int  # bytes: peak of the step without recomputation
    forward_end: int  # position in the order where the backward starts

    @property
    def recomputed(self) -> list[str]:
        return [name for name, spans in self.intervals.items() for _ in spans[1:]]


Planner = Callable[[MemoryModel], dict]


def _forward_end(model: MemoryModel) -> int:
    """Position in the order of the first backward storage node (len(order) if none)."""
    for t, unit in enumerate(model.units):
        node = unit.node
        if node.meta.get("partitioner_tag") == "is_backward":
            return t
        if any(a.op == "placeholder" and a.name.startswith("tangents") for a in node.all_input_nodes):
            return t
    return len(model.units)


def partition(
    joint_module: fx.GraphModule,
    num_fwd_outputs: int,
    planner: Planner,
    mutable_inputs: frozenset[str] = frozenset(),
    cost: str = DEFAULT_COST,
) -> Partition:
    """Split AOTAutograd's joint graph into forward and backward graphs on ``planner``'s
    schedule, the ops costed by the ``cost`` model (``COST_MODELS``)."""
    from torch._functorch.partitioners import _extract_fwd_bwd_modules

    for node in joint_module.graph.nodes:
        if node.op == "call_function" and is_mutating(node):
            raise ValueError(
                f"node {node.name} ({node.target}) mutates a tensor inside the training graph; "
                "rematerialization needs a functional graph (make the operation out-of-place)"
            )
    model = MemoryModel.from_graph(joint_module.graph, mutable_inputs, cost)
    intervals = planner(model)
    realized, when = realize(model, intervals)
    boundary = _forward_end(model)
    realized_gm = fx.GraphModule(joint_module, realized)
    in_forward = {n for n, t in when.items() if t < boundary and not (n.op == "placeholder" and n.name.startswith("tangents"))}
    saved = []
    for n in realized.nodes:
        crosses = any(u not in in_forward and u.op != "output" for u in n.users)
        if n in in_forward and n.op != "get_attr" and not is_split(n) and crosses:
            saved.append(n)
    output = next(n for n in realized.nodes if n.op == "output")
    grads = output.args[0][num_fwd_outputs:]
    for g in grads:
        if isinstance(g, fx.Node) and g in in_forward and g not in saved and g.op != "get_attr":
            saved.append(g)  # a gradient computed in the forward (e.g. of an unused input)
    saved_tensors = [n for n in saved if isinstance(n.meta.get("val"), torch.Tensor)]
    saved_symbols = [n for n in saved if not isinstance(n.meta.get("val"), torch.Tensor)]
    forward, backward = _extract_fwd_bwd_modules(
        realized_gm, saved_tensors, saved_symbols, num_fwd_outputs=num_fwd_outputs, ignore_must_be_in_fw_bw=True
    )
    for module in (forward, backward):
        _remove_unused(module)
    plain = max(liveness_profile(joint_module.graph), default=0)
    simulated = max(liveness_profile(realized), default=0)
    return Partition(model, intervals, realized, forward, backward, [n.name for n in saved], simulated, plain, boundary)


def _remove_unused(gm: fx.GraphModule) -> None:
    """Drop nodes nothing reads. The extraction keeps ops tagged random (attention without
    dropout is tagged so) even where nothing reads them; such a node would run and hold its
    outputs for nothing. The graphs here are functional, so dropping is safe."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and not node.users and not is_mutating(node):
                gm.graph.erase_node(node)
                changed = True
    gm.recompile()


class ScheduledTraining(TrainingStep):
    """The training step split on ``planner``'s schedule (``partition``), the ops costed by
    the ``cost`` model (``rewrite.cost_models.COST_MODELS``); ``partitions`` keeps a
    ``Partition`` per graph and input signature."""

    recompile_note = "remat: new input shapes or graph: tracing and planning the training step again"

    def __init__(self, planner: Planner, on_compile: Callable[[str], None] | None = None, cost: str = DEFAULT_COST):
        super().__init__(self._partition, on_compile)
        self.planner = planner
        self.cost = cost

    def _partition(self, joint: fx.GraphModule, num_fwd_outputs: int, mutable_inputs: frozenset[str]) -> Partition:
        return partition(joint, num_fwd_outputs, self.planner, mutable_inputs, self.cost)
