"""Regions that passes hand to codegen, and the step that compiles them.

A pass marks the elementwise nodes it wants fused into one emitted kernel with
``mark_region(nodes, label)`` (``grow_pointwise_region`` finds the largest such set around a
node). With ``optimize(..., codegen=True)`` (the default when CUDA is available) the
``CompileRegions`` step then replaces each marked region by one ``torch.ops.rewrite.pointwise``
call carrying the region's program: on CUDA it launches the Triton kernels codegen emitted for
it, forward and backward; elsewhere it runs the region op by op. A region codegen cannot
express is left as it was, and the report says why.

Fusing changes what training keeps for the backward: the fused op saves the region's inputs
and recomputes the rest inside its backward kernel, instead of saving every intermediate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from rewrite.graph import getitem, module_path, op_name
from rewrite.kernel_listing import example_tensor as _example
from rewrite.pass_infra import Change, Pass, PassContext, PassResult, Skip

REGION_KEY = "codegen_region"


def mark_region(nodes, label: str) -> None:
    """Ask codegen to fuse ``nodes`` (elementwise call_function nodes of one graph)."""
    for node in nodes:
        node.meta[REGION_KEY] = label


def marked_regions(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    regions: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        label = node.meta.get(REGION_KEY)
        if label is not None:
            regions[label].append(node)
    return dict(regions)


def is_pointwise(node: fx.Node) -> bool:
    """An elementwise ATen op codegen can express, producing one tensor."""
    from codegen.region import overload_name
    from codegen.sym import POINTWISE_OPS

    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    return isinstance(node.meta.get("val"), torch.Tensor) and overload_name(node.target) in POINTWISE_OPS


def grow_pointwise_region(seed: fx.Node) -> list[fx.Node]:
    """The elementwise nodes reachable from ``seed`` through elementwise producers and users
    that can become one op with it: none of them may reach another through a node outside
    the region (fusing them would make a cycle)."""
    if not is_pointwise(seed):
        return []
    return _grow(seed, is_pointwise)


def _grow(seed: fx.Node, admissible) -> list[fx.Node]:
    order = {n: k for k, n in enumerate(seed.graph.nodes)}
    region = {seed}
    frontier = [seed]
    while frontier:
        node = frontier.pop()
        for neighbour in list(node.all_input_nodes) + list(node.users):
            if neighbour in region or not admissible(neighbour) or _closes_cycle(region, neighbour, order):
                continue
            region.add(neighbour)
            frontier.append(neighbour)
    return sorted(region, key=order.__getitem__)


def _closes_cycle(region: set[fx.Node], node: fx.Node, order: dict) -> bool:
    """Whether adding ``node`` to the (cycle-free) ``region`` would let a path leave the
    region and come back: from ``node`` through outside nodes to the region, or from the
    region through outside nodes to ``node``."""
    first, last = min(order[n] for n in region), max(order[n] for n in region)

    def reaches_region(start: list[fx.Node], step, in_range) -> bool:
        seen, stack = set(), [n for n in start if n not in region and n is not node]
        while stack:
            current = stack.pop()
            if current in seen or not in_range(order[current]):
                continue
            seen.add(current)
            for nxt in step(current):
                if nxt in region:
                    return True
                if nxt is not node:
                    stack.append(nxt)
        return False

    downstream = reaches_region(list(node.users), lambda n: n.users, lambda k: k < last)
    upstream = reaches_region(list(node.all_input_nodes), lambda n: n.all_input_nodes, lambda k: k > first)
    return downstream or upstream


@dataclass(frozen=True)
class CompileRegions(Pass):
    """Replace each region a pass marked by one op running codegen's emitted kernels (exact)."""

    name: ClassVar[str] = "codegen"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from codegen.region import Region, UnsupportedRegion, extract_region

        result = PassResult()
        for label, nodes in self._pieces(gm, result):
            where = module_path(nodes[0])
            ops = ", ".join(sorted({op_name(n) for n in nodes}))
            try:
                sub, inputs, outputs = extract_region(nodes)
                region = Region.from_graph(sub)
                region.check_shapes([_example(i.meta["val"]) for i in inputs])
            except UnsupportedRegion as exc:
                result.skipped.append(Skip(label, where, ops, f"{exc}; the region runs as it was"))
                for node in nodes:
                    node.meta.pop(REGION_KEY, None)
                continue
            self._replace(gm, nodes, inputs, outputs, region.to_spec(), label)
            result.changes.append(
                Change(
                    label,
                    where,
                    ops,
                    "rewrite.pointwise",
                    f"{len(nodes)} ops fused; {len(inputs)} inputs, {len(outputs)} outputs",
                )
            )
        result.figures["regions_compiled"] = len(result.changes)
        result.figures["kernels_run_on"] = (
            "cuda (emitted Triton kernels)" if torch.cuda.is_available() else "cpu (PyTorch reference; kernels on CUDA)"
        )
        return result

    @staticmethod
    def _pieces(gm: fx.GraphModule, result: PassResult) -> list[tuple[str, list[fx.Node]]]:
        """The marked regions as they are now: a later pass may have replaced some of their
        nodes by ops codegen cannot fuse, leaving pieces; each connected piece that can be
        one op (no path out of it and back in) is compiled on its own."""
        pieces = []
        for label, nodes in marked_regions(gm).items():
            candidates = {n for n in nodes if is_pointwise(n)}
            for node in nodes:
                if node not in candidates:
                    node.meta.pop(REGION_KEY, None)
            parts = []
            for node in nodes:
                if node in candidates:
                    part = _grow(node, candidates.__contains__)
                    candidates -= set(part)
                    parts.append(part)
            for k, part in enumerate(parts):
                name = label if len(parts) == 1 else f"{label}_{chr(ord('a') + k)}"
                if len(part) < 2:
                    for n in part:
                        n.meta.pop(REGION_KEY, None)
                    reason = "one op left of the region after later passes; nothing to fuse"
                    result.skipped.append(Skip(name, module_path(part[0]), op_name(part[0]), reason))
                else:
                    pieces.append((name, part))
        return pieces

    @staticmethod
    def _replace(gm, nodes, inputs, outputs, spec: str, label: str) -> None:
        graph = gm.graph
        with graph.inserting_after(nodes[-1]):
            call = graph.call_function(torch.ops.rewrite.pointwise.default, (list(inputs), spec), name=label)
        call.meta["val"] = [o.meta["val"] for o in outputs]
        call.meta["stack_trace"] = nodes[0].meta.get("stack_trace")
        call.meta["nn_module_stack"] = nodes[0].meta.get("nn_module_stack", {})
        previous = call
        for k, out in enumerate(outputs):
            with graph.inserting_after(previous):
                item = getitem(graph, call, k, name=f"{label}_{k}")
            item.meta["val"] = out.meta["val"]
            out.replace_all_uses_with(item)
            previous = item
        for node in reversed(nodes):
            graph.erase_node(node)
        _stable_topological_order(graph)


def _stable_topological_order(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, moving as little as possible: a user
    of the region placed between its nodes now comes after the fused call."""
    placed: set[fx.Node] = set()
    visiting: set[fx.Node] = set()
    order: list[fx.Node] = []

    def place(node: fx.Node) -> None:
        stack = [(node, False)]
        while stack:
            current, ready = stack.pop()
            if current in placed:
                continue
            if ready:
                visiting.discard(current)
                placed.add(current)
                order.append(current)
                continue
            if current in visiting:
                raise RuntimeError(f"the graph has a cycle through {current.name}")
            visiting.add(current)
            stack.append((current, True))
            stack.extend((i, False) for i in reversed(current.all_input_nodes) if i not in placed)

    for node in list(graph.nodes):
        place(node)
    previous = None
    for node in order:
        if previous is not None and previous.next is not node:
            previous.append(node)
        previous = node
