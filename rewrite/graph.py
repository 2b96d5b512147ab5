"""Graph utilities every pass needs: sizes from ``meta["val"]``, FLOPs per node, inserting
nodes with their metadata, parameters behind ``get_attr`` nodes, a networkx view.

Sizes may be symbolic (a dynamic batch dimension); every number returned here is concrete,
evaluated at the example inputs the graph was captured with.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils.flop_counter import FlopCounterMode

# torch.export's checks of a value's dtype/device: no output, no effect on the computation.
ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default

# Node metadata that describes where a node came from; copied onto the nodes that replace it.
_PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


def concrete(value: Any) -> Any:
    """A SymInt/SymFloat evaluated at its example value; anything else unchanged."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:  # unbacked symbol: no example value exists
            raise ValueError(f"symbolic value {value} has no example value")
        return hint
    return value


def tensor_value(node: fx.Node) -> torch.Tensor | None:
    """The (fake) tensor a node produces, or None when it produces something else."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (symbolic sizes at their example values)."""
    numel = 1
    for size in t.shape:
        numel *= int(concrete(size))
    return numel * t.element_size()


def _flat_tensors(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _flat_tensors(v)]
    return []


def node_bytes(node: fx.Node) -> int:
    """Bytes of every tensor the node outputs (0 for non-tensor nodes and views' aliases are
    counted as their own tensors: callers that need storage sharing measure it instead)."""
    return sum(tensor_bytes(t) for t in _flat_tensors(node.meta.get("val")))


def fake_mode_of(gm: fx.GraphModule):
    """The FakeTensorMode the graph's metadata was created under (None if it has none)."""
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])


def _fake_args(node: fx.Node) -> tuple[tuple, dict]:
    def value(a: fx.Node):
        if "val" not in a.meta:
            raise ValueError(f"node {a.name} has no meta['val']")
        return a.meta["val"]

    return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)


def node_flops(node: fx.Node, fake_mode=None) -> int:
    """Floating-point operations of one call_function node (matmul-like ops; 0 for the
    pointwise ones), counted by torch.utils.flop_counter on the node's fake inputs."""
    if node.op != "call_function" or node.target is operator.getitem:
        return 0
    if fake_mode is None:
        fake_mode = detect_fake_mode(_flat_tensors(node.meta.get("val")))
    if fake_mode is None:
        return 0
    args, kwargs = _fake_args(node)
    counter = FlopCounterMode(display=False)
    with fake_mode, counter:
        node.target(*args, **kwargs)
    return int(concrete(counter.get_total_flops()))


def call_function(
    graph: fx.Graph,
    target,
    args: tuple,
    kwargs: dict | None = None,
    *,
    like: fx.Node | None = None,
    name: str | None = None,
) -> fx.Node:
    """Insert a call at the graph's current insertion point, with ``meta["val"]`` computed by
    running ``target`` on the fake values of its inputs, and provenance copied from ``like``."""
    node = graph.call_function(target, args, kwargs or {})
    if name is not None:
        node.name = graph._graph_namespace.create_name(name, None)
    if like is not None:
        for key in _PROVENANCE_KEYS:
            if key in like.meta:
                node.meta[key] = like.meta[key]
    try:
        fake_args, fake_kwargs = _fake_args(node)
        fake_mode = detect_fake_mode(_flat_tensors([fake_args, list(fake_kwargs.values())]))
        if fake_mode is None:
            raise ValueError(f"cannot compute metadata of {name or target}: its inputs have no fake tensors")
        with fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    except Exception:
        graph.erase_node(node)  # a caller that skips this rewrite must find the graph as it was
        raise
    return node


def getitem(graph: fx.Graph, node: fx.Node, index: int, *, name: str | None = None) -> fx.Node:
    """``node[index]`` as a graph node with its metadata."""
    item = graph.call_function(operator.getitem, (node, index))
    if name is not None:
        item.name = graph._graph_namespace.create_name(name, None)
    for key in _PROVENANCE_KEYS:
        if key in node.meta:
            item.meta[key] = node.meta[key]
    item.meta["val"] = node.meta["val"][index]
    return item


def attr_owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The module that holds attribute ``target`` ("a.b.weight") and the attribute's name."""
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def get_attr_value(gm: torch.nn.Module, node: fx.Node) -> Any:
    if node.op != "get_attr":
        raise ValueError(f"node {node.name} is not a get_attr node")
    owner, leaf = attr_owner(gm, node.target)
    return getattr(owner, leaf)


def is_shared_tensor(gm: torch.nn.Module, node: fx.Node) -> bool:
    """True when the tensor behind get_attr ``node`` is read by any other node, or is the
    same object as another parameter/buffer (tied weights)."""
    if len(node.users) != 1:
        return True
    value = get_attr_value(gm, node)
    others = 0
    for _, tensor in gm.named_parameters(remove_duplicate=False):
        others += tensor is value
    for _, tensor in gm.named_buffers(remove_duplicate=False):
        others += tensor is value
    if others > 1:
        return True
    readers = [n for n in gm.graph.find_nodes(op="get_attr") if n is not node]
    return any(get_attr_value(gm, n) is value for n in readers)


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost nn.Module the node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    # torch.export records paths like "L['self'].blocks[0].mlp" or "blocks.0.mlp".
    if path.startswith("_empty_nn_module_stack"):  # torch.export's label for nodes outside any module
        return ""
    if path.startswith("_export_root"):  # torch.export's wrapper around the model; a user's "_enc" is a module
        path = path[len("_export_root") :]
    path = path.replace("L['self']", "").replace("L__self__", "")
    for token in ("['", "']", "[", "]"):
        path = path.replace(token, ".")
    return ".".join(p for p in path.split(".") if p)


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase those of ``nodes`` left without users (and the metadata assertions hanging off
    them), last node first so that a chain of them goes entirely."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=position.__getitem__, reverse=True):
        users = list(node.users)
        if all(u.target is ASSERT_METADATA for u in users):
            for user in users:
                graph.erase_node(user)
            graph.erase_node(node)


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as a networkx DiGraph: one vertex per node name with ``op``, ``target``,
    ``bytes`` (output size) and ``flops``; an edge for every data dependency."""
    fake_mode = fake_mode_of(gm)
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(
            node.name,
            op=node.op,
            target=str(node.target),
            bytes=node_bytes(node),
            flops=node_flops(node, fake_mode) if node.op == "call_function" else 0,
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def format_shape(node: fx.Node) -> str:
    """'f32[8, 197, 768]' for a tensor node, a tuple of those for multi-output nodes."""
    return describe_value(node.meta.get("val"))


_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "b8",
}


def describe_value(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(s) for s in val.shape)
        return f"{_DTYPE_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe_value(v) for v in val) + ")"
    return ""


def op_name(node: fx.Node) -> str:
    """A short readable name of what a node calls: 'aten.linear', 'rewrite.regelu2', 'getitem'."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        overload = target._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    if callable(target):
        return getattr(target, "__name__", str(target))
    return str(target)
