"""Schedules for remat's solver to start from, so that its answer is never worse than them:
PyTorch's min-cut partition and checkpointing every block, each written as retention
intervals over a training step's ``MemoryModel`` (``solvers.schedule`` semantics).

A partition of the joint forward+backward graph says which forward tensors are *saved* for
the backward. Every other forward tensor the backward reads is dropped after its last
forward use and recomputed once, just before its first backward use, and kept until its
last; its inputs must be alive then, so they are saved or recomputed there too (a chain).
``intervals_from_saved`` turns a saved set into such a schedule; ``training_starts`` gives
the schedules of

- "min-cut": ``torch._functorch.partitioners.min_cut_rematerialization_partition`` on the
  joint graph (what ``torch.compile`` does), at a few settings of its
  ``activation_memory_budget``;
- "checkpoint every block": ``torch.utils.checkpoint`` around every block, the blocks being
  the repeated children of a module list (``layers.0``, ``layers.1``, ... or ``blocks.N``:
  the first numbered part of each op's ``nn_module_stack`` path). A block's input is saved,
  its insides are recomputed in the backward; ops outside every block are saved.

A tensor that may not be recomputed (``recompute=False``: random ops, ops that read a buffer
the step updates) or that must stay to the end is saved whatever the partition says. The
solver keeps the schedules that are valid and fit the budget (``solvers.moccasin.solve``'s
``starts``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.fx as fx

from passes.remat.lower import _forward_end
from rewrite.graph import module_path
from rewrite.liveness import MemoryModel
from solvers.schedule import recomputable

# min-cut's activation_memory_budget: lower settings save less and recompute more (its
# knapsack over the saved activations). Not 1, its default: that saves about what the plain
# step keeps, which the solver has anyway. A partition takes 0.2 s or so on a small model.
MIN_CUT_SETTINGS = (0.9, 0.7, 0.5, 0.3, 0.1)
CHECKPOINT = "checkpoint every block"


def training_starts(model: MemoryModel, fits: Callable[[dict], bool] | None = None) -> dict[str, dict]:
    """Named schedules (intervals) of the partitions above for a training step's model;
    empty when the graph is no joint forward+backward graph (``graph="inference"``).

    ``fits``: whether a schedule meets the budget (None: all settings). With it, min-cut's
    settings are tried from the lowest up and none above the first whose schedule does not
    fit (a higher setting saves more): a start must fit, and one partition of a thousand-node
    graph takes about a second."""
    boundary = _forward_end(model)
    if boundary >= len(model.order):
        return {}
    starts = {}
    settings = sorted(MIN_CUT_SETTINGS) if fits is not None else MIN_CUT_SETTINGS
    for setting, saved in min_cut_saved(model, settings):
        intervals = intervals_from_saved(model, boundary, saved)
        if fits is not None and not fits(intervals):
            break
        starts[f"min-cut {setting:g}"] = intervals
    blocks = block_saved(model, boundary)
    if blocks is not None:
        starts[CHECKPOINT] = intervals_from_saved(model, boundary, blocks)
    return starts


def intervals_from_saved(model: MemoryModel, forward_end: int, saved: set[str]) -> dict:
    """Intervals over ``model.order`` with every forward unit not in ``saved`` that the
    backward reads recomputed once: from its first backward use (its own or that of a
    recomputation that reads it) to its last. Processed last to first, so a unit's
    recomputed users have their times before it is placed."""
    graph, order = model.graph, model.order
    position = {name: t for t, name in enumerate(order)}
    last = len(order) - 1
    dropped = {v for v in order[:forward_end] if v not in saved and v not in model.keep and recomputable(graph, v)}
    recomputed_at: dict[str, int] = {}
    intervals: dict[str, list[tuple[int, int]]] = {}
    for name in reversed(order):
        pos = position[name]
        reads = [pos]
        for user in graph.successors(name):
            reads.append(position[user])
            if user in recomputed_at:
                reads.append(recomputed_at[user])
        if name in model.keep:
            reads.append(last)
        if name in dropped:
            end = max(t for t in reads if t < forward_end)
            backward = [t for t in reads if t >= forward_end]
            # The solver's form: a recomputation at least two steps after the interval before.
            if backward and min(backward) >= end + 2:
                recomputed_at[name] = min(backward)
                intervals[name] = [(pos, end), (min(backward), max(backward))]
                continue
        intervals[name] = [(pos, max(reads))]
    return intervals


def min_cut_saved(model: MemoryModel, settings=MIN_CUT_SETTINGS) -> Iterator[tuple[float, set[str]]]:
    """(setting, units min-cut saves for the backward) for each of ``settings`` in turn, each
    partitioned when it is asked for (one min-cut fails on is left out: its partition is
    only a start)."""
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    joint = model.fx_graph
    outputs = next(n for n in joint.nodes if n.op == "output").args[0]
    primals = [n for n in joint.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    # AOTAutograd's joint graph returns the forward's outputs, then a gradient per primal.
    num_fwd_outputs = len(outputs) - len(primals)
    if num_fwd_outputs < 1:
        return
    by_name = {n.name: n for n in joint.nodes}
    for setting in settings:
        copy = _copy(joint)
        try:
            # cse=False: min-cut partitions the graph as the solver sees it (its CSE would merge
            # units the solver counts apart, and takes a second to import on first use)
            with functorch_config.patch(activation_memory_budget=setting, cse=False):
                _, backward = min_cut_rematerialization_partition(copy, None, num_fwd_outputs=num_fwd_outputs)
        except Exception:  # noqa: BLE001 - min-cut refusing a graph only means one start fewer
            continue
        saved = set()
        for node in backward.graph.nodes:
            if node.op == "placeholder" and not node.name.startswith("tangents") and node.name in by_name:
                unit = model.root.get(by_name[node.name])
                if unit is not None:
                    saved.add(unit)
        yield setting, saved


def block_saved(model: MemoryModel, forward_end: int) -> set[str] | None:
    """Units checkpointing every block saves: those outside every block and those a block
    computes and something outside it reads in the forward (its output). None without at
    least two blocks."""
    blocks = {u.name: _block(u.node) for u in model.units[:forward_end]}
    lists: dict[str, set[str]] = {}
    for block in blocks.values():
        if block is not None:
            parent, _, index = block.rpartition(".")
            lists.setdefault(parent, set()).add(index)
    if not any(len(indices) > 1 for indices in lists.values()):
        return None
    repeated = {name: block for name, block in blocks.items()
                if block is not None and len(lists[block.rpartition(".")[0]]) > 1}  # fmt: skip
    saved = set()
    for name in model.order[:forward_end]:
        block = repeated.get(name)
        if block is None or any(
            u in blocks and repeated.get(u) != block for u in model.graph.successors(name)
        ):
            saved.add(name)
    return saved


def _block(node: fx.Node) -> str | None:
    """The path up to the first numbered part of the node's module path ("layers.3" for
    "layers.3.mlp.fc1"), or None."""
    parts = module_path(node).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _copy(graph: fx.Graph) -> fx.GraphModule:
    """A module over a copy of ``graph`` (min-cut changes the graph it is given)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = new.graph_copy(graph, env)
    new.output(output)
    root = graph.owning_module if graph.owning_module is not None else torch.nn.Module()
    return fx.GraphModule(root, new)
