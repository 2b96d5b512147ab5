"""The training step as one graph, its memory over time, and running it on a schedule.

AOTAutograd traces a module's forward and backward into one *joint* graph and hands it to a
partition function, which splits it into the forward graph (whose extra outputs are what the
backward reads: the saved tensors) and the backward graph. ``ScheduledTraining`` supplies that
partition function: it turns the joint graph into a ``MemoryModel`` (one entry per tensor the
step allocates: its bytes, its cost, whether it may be recomputed), asks a *planner* for
retention intervals over the graph's order (``solvers.schedule`` semantics), writes the graph
out again in that order with a copy of a node at every recomputation (``realize``), and splits
it where the forward ends. Whatever is alive across that point is saved; everything else is
freed after its last use and recomputed where the schedule says.

Memory model. A *storage node* is a call_function node that allocates: aliases (views,
``getitem`` of a multi-output op, ``_unsafe_view``) own no memory and keep their base alive.
Inputs (parameters, buffers, the model's inputs, the backward's incoming gradients) are alive
throughout and not counted. The memory at a point of the order is the bytes of the storage
nodes alive there; a node is alive from its computation to its last use, outputs (the model's
outputs and the gradients) to the end. ``measure_peak`` measures the same quantity for real:
the peak bytes of the storages allocated while a function runs and still alive.

Cost of running an op once, by one of ``COST_MODELS``:

- ``flops`` (the default): its FLOPs (``torch.utils.flop_counter``, which counts matmuls,
  convolutions and attention) plus one per byte it reads and writes. Recomputing a matmul or
  convolution weighs far more than a pointwise op over the same tensors (what PyTorch's
  min-cut partitioner assumes, as it is where pointwise ops are fused): the schedule
  recomputes the fewest FLOPs, and the fewest bytes among those.
- ``roofline``: the larger of its FLOPs and ``FLOPS_PER_BYTE`` times the bytes it moves.
  Nearer the time an op takes when each op runs on its own, as these graphs do: a pointwise
  op over a large tensor can cost more than a small convolution.
- ``measured``: the time the op takes on this machine, in nanoseconds, run on random tensors
  of its inputs' shapes (``measure_op_times``); an op that cannot run that way gets its
  roofline cost at the measured ops' typical time per unit.

Random ops (``nondeterministic_seeded``) are never recomputed: a second draw would differ.
"""

from __future__ import annotations

import math
import operator
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.graph import concrete, node_bytes, node_flops, tensor_bytes

aten = torch.ops.aten

# Machine balance used to put memory-bound ops on the FLOP scale (about that of a CPU core or
# a GPU's pointwise path; only the ratio between ops matters to the solvers).
FLOPS_PER_BYTE = 10
COST_MODELS = ("flops", "roofline", "measured")
DEFAULT_COST = "flops"

# Ops whose output shares its input's storage although their schema does not say so.
_STORAGE_SHARING = {aten._unsafe_view.default, aten.alias.default, aten.detach.default}


def is_alias(node: fx.Node) -> bool:
    """Whether the node's output is a view of (part of) one of its inputs."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or node.target in _STORAGE_SHARING:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns))


def is_random(node: fx.Node) -> bool:
    """Whether running the node twice may give different values: a random op, unless its
    dropout probability is 0 (attention without dropout is tagged random too) or it is off."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        values.update({a.name: v for a, v in zip(schema.arguments, node.args)})
        values.update(node.kwargs)
        if "dropout_p" in values:
            return values["dropout_p"] not in (0, 0.0)
        if node.target in (aten.native_dropout.default, aten.dropout.default) and (
            values.get("p") in (0, 0.0) or values.get("train") is False
        ):
            return False
    return True


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


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
        backward the input holds its new value. ``cost``: one of ``COST_MODELS`` (see the
        module's docstring), or None to leave every cost 0 (for memory alone: counting FLOPs
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
            elif node.target is operator.getitem and _is_split(node.args[0]):
                root[node] = node.name  # a unit of its own, added with its op below
            elif is_alias(node):
                base = node.args[0]
                root[node] = root.get(base) if isinstance(base, fx.Node) else None
            elif _is_split(node):
                root[node] = None
                parts = [u for u in node.users if u.target is operator.getitem]
                parts.sort(key=lambda g: -node_bytes(g))
                units.extend(Unit(g.name, node, g.args[1]) for g in parts)
            else:
                root[node] = node.name
                units.append(Unit(node.name, node))
        graph = nx.DiGraph()
        flops: dict[str, int] = {}
        op_cost: dict[fx.Node, float] = {}
        for unit in units:
            node = unit.node
            if node.op == "placeholder" or node.name in flops:
                continue
            try:
                flops[node.name] = node_flops(node) if cost is not None else 0
            except Exception:  # an op the flop counter cannot run on fake tensors: bytes only
                flops[node.name] = 0
            moved = node_bytes(node) + sum(node_bytes(a) for a in node.all_input_nodes)
            if cost == "flops":
                op_cost[node] = flops[node.name] + moved
            else:
                op_cost[node] = max(flops[node.name], FLOPS_PER_BYTE * moved) if cost is not None else 0
        if cost == "measured":
            op_cost = _measured_costs(op_cost)
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


_BATCH_NORM = aten._native_batch_norm_legit_functional.default


def _real_like(value: Any, generators: dict) -> Any:
    """A real tensor with ``value``'s shape, strides, dtype and device (random floats drawn from
    ``generators``, one per device, so the user's random state is left alone; zero integers:
    valid indices), or the value itself when it is not a tensor."""
    if isinstance(value, (list, tuple)):
        return type(value)(_real_like(v, generators) for v in value)
    if not isinstance(value, torch.Tensor):
        return concrete(value)
    shape = [int(concrete(s)) for s in value.shape]
    stride = [int(concrete(s)) for s in value.stride()]
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    device = value.device
    if value.dtype.is_floating_point or value.dtype.is_complex:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(0)
        flat = torch.randn(size, dtype=value.dtype, device=device, generator=generators[device])
    else:
        flat = torch.zeros(size, dtype=value.dtype, device=device)
    return flat.as_strided(shape, stride)


def _op_signature(node: fx.Node) -> Any:
    """What an op's time depends on: its target, its inputs' shapes, strides, dtypes and
    devices, and its other arguments. Nodes with one signature are timed once (and so get
    one cost: the solver's symmetric choices stay symmetric)."""

    def describe(value):
        if isinstance(value, fx.Node):
            value = value.meta["val"]
        if isinstance(value, torch.Tensor):
            sizes = tuple(int(concrete(n)) for n in (*value.shape, *value.stride()))
            return ("tensor", sizes, value.dtype, str(value.device))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        return repr(concrete(value))  # symbolic sizes at their example values

    return (str(node.target), describe(node.args), describe(node.kwargs))


def measure_op_times(nodes: list[fx.Node], repeats: int = 3) -> dict[fx.Node, float | None]:
    """Seconds each call_function node takes on this machine: the fastest of ``repeats`` runs
    after one warm-up, on tensors made from its inputs' ``meta["val"]`` (``_real_like``) and
    freed after it; nodes with the same ``_op_signature`` are timed once. None for a node
    that cannot run that way (its metadata is missing, or its op needs values random ones do
    not give) and for random ops, which would draw from the user's generator (they are never
    recomputed: their cost does not matter)."""
    with unset_fake_temporarily():  # AOTAutograd partitions under its fake mode: run for real
        return _time_ops(nodes, repeats)


def _time_ops(nodes: list[fx.Node], repeats: int) -> dict[fx.Node, float | None]:
    times: dict[fx.Node, float | None] = {}
    timed: dict[Any, float | None] = {}
    generators: dict = {}
    for node in nodes:
        times[node] = None
        # an op that outputs no tensor (an assert, say) frees nothing when recomputed, and
        # one that draws random numbers is never recomputed: neither is worth running
        if node.op != "call_function" or is_random(node) or node_bytes(node) == 0:
            continue
        try:
            signature = _op_signature(node)
            if signature in timed:
                times[node] = timed[signature]
                continue
            timed[signature] = None
            args = fx.node.map_arg(node.args, lambda a: _real_like(a.meta["val"], generators))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: _real_like(a.meta["val"], generators))
            tensors = [*pytree.tree_leaves((args, kwargs)), *pytree.tree_leaves(node.meta.get("val"))]
            cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
            best = math.inf
            with torch.no_grad():
                for i in range(repeats + 1):
                    if cuda:
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    out = node.target(*args, **kwargs)
                    if cuda:
                        torch.cuda.synchronize()
                    if i:
                        best = min(best, time.perf_counter() - started)
                    del out
            times[node] = timed[signature] = best
        except Exception:  # missing metadata, or values random ones do not give
            continue
    if any(device.type == "cuda" for device in generators):
        torch.cuda.empty_cache()  # the timed ops' blocks go back: the step is measured after
    return times


def _measured_costs(roofline: dict[fx.Node, float]) -> dict[fx.Node, float]:
    """Nanoseconds per op (``measure_op_times``); an op that cannot be timed gets its roofline
    cost at the median time per roofline unit of the ops that could."""
    times = measure_op_times(list(roofline))
    ratios = sorted(t / roofline[n] for n, t in times.items() if t is not None and roofline[n] > 0)
    per_unit = ratios[len(ratios) // 2] if ratios else 1e-9 / FLOPS_PER_BYTE
    return {n: 1e9 * (t if t is not None else roofline[n] * per_unit) for n, t in times.items()}


def _is_training_batch_norm(node: fx.Node) -> bool:
    return node.target is _BATCH_NORM and bool(node.args[5])


def _recomputable(unit: Unit, mutable_inputs: frozenset[str]) -> bool:
    node = unit.node
    if is_random(node):
        return False
    if _is_training_batch_norm(node):
        # Its output and batch statistics (outputs 0-2) do not depend on the running
        # statistics, which the step updates in place: a recomputation runs the op without
        # them (see ``_recomputation``). The updated statistics themselves are not recomputed.
        return unit.index is not None and unit.index < 3
    return not _reads_any(node, mutable_inputs)


def _recomputation(node: fx.Node, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The op, arguments and keyword arguments that recompute ``node``'s outputs."""
    if _is_training_batch_norm(node):
        x, weight, bias, _mean, _var, training, momentum, eps = args
        return aten._native_batch_norm_legit.no_stats, (x, weight, bias, training, momentum, eps), kwargs
    return node.target, args, kwargs


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


def _is_split(node) -> bool:
    """A multi-output op whose outputs are only taken apart with getitem."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and isinstance(node.meta.get("val"), (tuple, list))
        and not is_alias(node)
        and bool(node.users)
        and all(u.target is operator.getitem for u in node.users)
    )


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
        target = node.target
        if again:
            target, args, kwargs = _recomputation(node, args, kwargs)
        copy = new.create_node(node.op, target, args, kwargs, name=name)
        copy.meta = dict(node.meta)
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


def liveness_profile(graph: fx.Graph) -> list[int]:
    """Bytes of storage alive while each node of ``graph`` runs, each freed after its last
    use (as fx's generated code and the Interpreter free them); outputs stay to the end. An
    op's outputs are all allocated when it runs, and the tuple of a multi-output op holds
    every output until the op's last ``getitem`` has run (outputs nobody takes included)."""
    model = MemoryModel.from_graph(graph, cost=None)
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
    tuple_end = {n: max(index[u] for u in n.users) for n in nodes if _is_split(n)}
    delta = [0] * (len(nodes) + 1)

    def alive(mem: int, born: int, dies: int) -> None:
        delta[born] += mem
        delta[max(dies, born) + 1] -= mem

    taken: dict[fx.Node, set[int]] = {}
    for unit in model.units:
        mem = model.graph.nodes[unit.name]["mem"]
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


# --------------------------------------------------------------------------- training


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


def _boxed(gm: fx.GraphModule, example_inputs) -> Callable:
    """Run a graph through the Interpreter in the boxed convention: arguments are released as
    soon as their last use has run (the saved tensors in the backward, in particular)."""

    def run(args: list) -> Any:
        return fx.Interpreter(gm).boxed_run(args)

    run._boxed_call = True
    return run


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
        if n in in_forward and n.op != "get_attr" and not _is_split(n) and crosses:
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


def graph_fingerprint(gm: fx.GraphModule) -> str:
    return gm.code


class _Interpreted(torch.nn.Module):
    """Runs a GraphModule node by node with each node's metadata current, so the joint
    graph's nodes carry the module path and stack trace of the node they came from."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, args, kwargs):
        from rewrite.memory import flatten_inputs

        with fx_traceback.preserve_node_meta():
            # the graph's flat outputs: the caller rebuilds the model's output structure
            return fx.Interpreter(self.gm).run(*flatten_inputs(self.gm, args, kwargs), enable_io_processing=False)


class ScheduledTraining:
    """Runs a GraphModule's training calls through AOTAutograd with ``planner``'s schedule.

    Compiled once per graph and input signature (shapes, dtypes, which tensors need
    gradients); the planner is asked again for each, and ``partitions`` keeps what it chose.
    Parameters and buffers are read from the module at each call, so the compiled step
    follows the module's weights (and updates its batch-norm statistics in place). ``cost``
    is the cost model the planner's problems are priced by (``COST_MODELS``).
    """

    def __init__(self, planner: Planner, on_compile: Callable[[str], None] | None = None, cost: str = DEFAULT_COST):
        self.planner = planner
        self.cost = cost
        self.on_compile = on_compile
        self._compiled: dict[Any, Callable] = {}
        self.partitions: dict[Any, Partition] = {}

    def __deepcopy__(self, memo):
        # compiled steps read every tensor from their arguments: a copy may share them
        return self

    def applies(self, gm: fx.GraphModule, args, kwargs) -> bool:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return any(p.requires_grad for p in gm.parameters()) or any(t.requires_grad for t in tensors)

    def _key(self, gm, state, leaves):
        def describe(t):
            if isinstance(t, torch.Tensor):
                return (tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
            return (type(t).__name__, t if isinstance(t, (int, float, bool, str, type(None))) else id(t))

        return (graph_fingerprint(gm), tuple(state), tuple(describe(t) for t in [*state.values(), *leaves]))

    def _compiled_for(self, gm: fx.GraphModule, args: tuple, kwargs: dict):
        from torch._functorch.aot_autograd import aot_function

        params = dict(gm.named_parameters())
        state = {**params, **dict(gm.named_buffers())}
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = self._key(gm, state, leaves)
        compiled = self._compiled.get(key)
        if compiled is None:
            names, count = list(state), len(state)
            interpreted = _Interpreted(gm)

            def step(*flat):
                call_args, call_kwargs = pytree.tree_unflatten(list(flat[count:]), spec)
                state = {f"gm.{name}": t for name, t in zip(names, flat[:count])}
                return torch.func.functional_call(interpreted, state, (call_args, call_kwargs))

            def partition_fn(joint, _joint_inputs, *, num_fwd_outputs, **_ignored):
                # AOTAutograd names the flat inputs primals_1, primals_2, ...: parameters, then buffers
                buffers = frozenset(f"primals_{i + 1}" for i in range(len(params), count))
                chosen = partition(joint, num_fwd_outputs, self.planner, buffers, self.cost)
                self.partitions[key] = chosen
                return chosen.forward, chosen.backward

            compiled = aot_function(
                step,
                fw_compiler=_boxed,
                bw_compiler=_boxed,
                partition_fn=partition_fn,
                num_params_buffers=count,
            )
            self._compiled[key] = compiled
        return key, compiled, [*state.values(), *leaves]

    def prepare(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Partition:
        """Trace, plan and compile the step for these inputs without changing anything: the
        forward runs once (AOTAutograd compiles on a call) with the random state forked and
        the buffers restored afterwards. Returns the partition the planner chose."""
        key, compiled, flat = self._compiled_for(gm, args, kwargs)
        if key not in self.partitions:
            buffers = [(b, b.detach().clone()) for b in gm.buffers()]
            try:
                with torch.random.fork_rng(devices=[]):
                    compiled(*flat)
            finally:
                with torch.no_grad():
                    for tensor, value in buffers:
                        tensor.copy_(value)
        return self.partitions[key]

    def __call__(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        key, compiled, flat = self._compiled_for(gm, args, kwargs)
        if key not in self.partitions and self.on_compile:
            self.on_compile("remat: new input shapes or graph: tracing and planning the training step again")
        out = compiled(*flat)
        return gm.graph._codegen.process_outputs(out)


# --------------------------------------------------------------------------- measuring


class _LiveStorage(TorchDispatchMode):
    """Counts the bytes of storages created by ops while active, until each storage dies."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta"
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, FakeTensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                # a view of an input (or of a tensor that existed before) is not an allocation
                if key and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    nbytes = storage.nbytes()
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes of the tensors ``fn`` allocates and holds at once (its intermediates; what
    existed before, such as parameters and inputs, is not counted). On CUDA this is
    ``max_memory_allocated`` above the memory in use when ``fn`` starts."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = _LiveStorage()
    with tracker:
        fn()
    return tracker.peak
