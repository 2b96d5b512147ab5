"""Graph utilities every pass needs: sizes from ``meta["val"]``, FLOPs per node, inserting
nodes with their metadata, parameters behind ``get_attr`` nodes, a networkx view.

A replacement is written as plain PyTorch and traced into the graph in front of what it
replaces, with its metadata and provenance (``Rules.apply`` in ``rewrite.pattern`` then
hands the root's users over to it)::

    new = replace_by_example(match, lambda x, w, b: torch.nn.functional.linear(x, w, b), m["x"], m["w"], m["b"])
    scale = add_parameter(gm, "fc.scale", torch.nn.Parameter(torch.ones(8)), like=match.root)

Sizes may be symbolic (a dynamic batch dimension); every number returned here is concrete,
evaluated at the example inputs the graph was captured with.
"""

from __future__ import annotations

import numbers
import operator
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.multiprocessing.reductions import StorageWeakRef
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


def users(node: fx.Node) -> list[fx.Node]:
    """Readers of the node's value; torch.export's dtype/shape assertions read nothing."""
    return [u for u in node.users if u.target is not ASSERT_METADATA]


def is_get_attr(value: Any) -> bool:
    """Whether ``value`` is a node reading a parameter, buffer or constant of the module."""
    return isinstance(value, fx.Node) and value.op == "get_attr"


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number literal (an int or float argument, not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def nodes_by_storage(graph: fx.Graph) -> dict[StorageWeakRef, list[fx.Node]]:
    """Tensor nodes grouped by the (fake) storage their value lives in: a view and its base
    share one, so an in-place op on one of them is seen by all of the group."""
    groups: dict = defaultdict(list)
    for node in graph.nodes:
        val = tensor_value(node)
        if val is not None:
            groups[StorageWeakRef(val.untyped_storage())].append(node)
    return groups


def out_of_place_problem(node: fx.Node, mutated: fx.Node) -> str | None:
    """Why in-place ``node`` (which mutates ``mutated``) cannot be computed out of place, or
    None: out of place is right only when nothing else can see the mutation."""
    if mutated.op in ("placeholder", "get_attr"):
        return f"in-place {op_name(node)} of a model input or parameter: the mutation is visible to the caller"
    aliases = [n for n in next(g for g in nodes_by_storage(node.graph).values() if mutated in g) if n not in (node, mutated)]
    if aliases:
        return f"in-place {op_name(node)} of a tensor that shares memory with {aliases[0].name} (a view of it or its base)"
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u for u in users(mutated) if u is not node and order[u] > order[node]]
    return f"in-place {op_name(node)} whose input is read again afterwards (by {later[0].name})" if later else None


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


def replace_by_example(match, fn, *args, **kwargs) -> fx.Node:
    """The node computing ``fn(*args, **kwargs)``, inserted before ``match.root``: ``fn`` is plain
    PyTorch (``torch.ops.aten.silu.default``, ``lambda x, w: F.linear(x, w)``), traced on the
    fake values of the arguments that are nodes; other arguments are constants baked in.

    Traced at the level torch.export's graphs are (pre-dispatch ATen): ``F.linear`` stays
    ``aten.linear``, as in the graph it joins. Every new node gets ``meta["val"]`` and the
    root's provenance (module path, stack trace), so reports place it where the root was.
    The root's users are left alone: ``Rules.apply`` moves them to the returned node, which
    is an argument itself when ``fn`` returns one unchanged."""
    root = match.root
    flat, spec = pytree.tree_flatten((args, kwargs))
    inputs = [a for a in flat if isinstance(a, fx.Node)]
    if root in inputs:  # its users are to read the replacement: one of them cannot be the replacement
        raise ValueError(f"the replacement of {root.name} cannot read {root.name} itself")
    for node in inputs:
        if "val" not in node.meta:
            raise ValueError(f"cannot trace a replacement of {root.name}: its input {node.name} has no meta['val']")

    def with_inputs(*values):
        given = iter(values)
        filled = [next(given) if isinstance(a, fx.Node) else a for a in flat]
        call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        return fn(*call_args, **call_kwargs)

    values = [node.meta["val"] for node in inputs]
    fake_mode = detect_fake_mode([root.meta.get("val"), *values])
    if fake_mode is None:
        raise ValueError(f"cannot trace a replacement of {root.name}: the graph has no fake values (meta['val'])")
    with fake_mode:
        example = make_fx(with_inputs, tracing_mode="real", pre_dispatch=True)(*values)
    env = dict(zip(example.graph.find_nodes(op="placeholder"), inputs))
    graph = root.graph
    with graph.inserting_before(root):
        for node in example.graph.nodes:
            if node.op == "get_attr":  # a tensor made inside fn: the graph module would not own it
                raise ValueError(
                    f"the replacement of {root.name} creates a tensor constant: pass it in as an argument "
                    "made with rewrite.graph.add_parameter"
                )
            if node.op == "call_function":
                env[node] = graph.node_copy(node, env.__getitem__)
                for key in _PROVENANCE_KEYS:  # the tracer's own point into the rule, not the model
                    env[node].meta.pop(key, None)
                    if key in root.meta:
                        env[node].meta[key] = root.meta[key]
    new = fx.node.map_arg(example.graph.output_node().args[0], env.__getitem__)
    if not isinstance(new, fx.Node):
        raise ValueError(f"the replacement of {root.name} must return one tensor, not {type(new).__name__}")
    return new


def add_parameter(gm: fx.GraphModule, name_hint: str, tensor: torch.Tensor, *, like: fx.Node) -> fx.Node:
    """Register ``tensor`` on ``gm`` and return a ``get_attr`` node reading it, inserted before
    ``like`` (the node that will use it), with ``meta["val"]``. An ``nn.Parameter`` becomes a
    parameter (trained, saved), any other tensor a buffer (saved). The name is ``name_hint``
    ("fc.bias": attribute ``bias`` of submodule ``fc``, which must exist), or with ``_1``,
    ``_2``... appended when that is taken."""
    name, suffix = name_hint, 0
    while has_attr(gm, name):
        suffix += 1
        name = f"{name_hint}_{suffix}"
    owner, leaf = attr_owner(gm, name)
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(leaf, tensor)
    else:
        owner.register_buffer(leaf, tensor)
    fake_mode = detect_fake_mode([like.meta.get("val")]) or fake_mode_of(gm)
    if fake_mode is None:
        raise ValueError(f"cannot add {name}: the graph has no fake values (meta['val'])")
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(tensor)
    return node


def has_attr(gm: torch.nn.Module, target: str) -> bool:
    """Whether ``gm`` has the attribute at the dotted path ``target`` (its submodules included)."""
    try:
        owner, leaf = attr_owner(gm, target)
    except AttributeError:
        return False
    return hasattr(owner, leaf)


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


def set_attr_value(gm: torch.nn.Module, node: fx.Node, value: Any) -> None:
    """Put ``value`` (a new ``nn.Parameter``, a tensor) where get_attr ``node`` reads: every
    reader of that attribute then reads the new value. The node's ``meta["val"]`` is kept, so
    the value should have the old one's shape and dtype."""
    if node.op != "get_attr":
        raise ValueError(f"node {node.name} is not a get_attr node")
    owner, leaf = attr_owner(gm, node.target)
    setattr(owner, leaf, value)


def drop_unused_attributes(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[str]:
    """Erase those of the get_attr ``nodes`` that nothing reads any more (metadata assertions
    aside) and delete their attributes from ``gm`` where no other node reads them: the
    parameters a rewrite made unused leave the module. Returns the attributes deleted."""
    dropped = []
    for node in list(nodes):
        if node.graph is not gm.graph or node not in gm.graph.nodes or users(node):
            continue
        target = node.target
        erase_dead(gm.graph, [node])
        if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")):
            owner, leaf = attr_owner(gm, target)
            delattr(owner, leaf)
            dropped.append(target)
    return dropped


def is_shared_tensor(gm: torch.nn.Module, node: fx.Node) -> bool:
    """True when the tensor behind get_attr ``node`` is read by any other node, or is the
    same object as another parameter/buffer (tied weights)."""
    if len(users(node)) != 1:
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


def module_path(node: fx.Node, backward: bool = False) -> str:
    """Qualified name of the innermost nn.Module the node was traced in ('' for the root).
    ``backward``: for a node of a joint graph's backward, which has no module of its own, the
    module whose forward it differentiates."""
    stack = node.meta.get("nn_module_stack") or (node.meta.get("fwd_nn_module_stack") if backward else None)
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
