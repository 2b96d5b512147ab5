"""A pointwise region as data: a small program of ATen ops over the region's inputs.

A region is what a pass hands to codegen: a connected set of elementwise ATen nodes, plus
view ops (unsqueeze, expand, permute, ...) applied to its inputs. ``Region`` keeps it as a
JSON-serialisable program, so that the ``torch.ops.rewrite.pointwise`` op can carry it as a
string argument through export and ``.pt2`` files, and so that three things derive from one
description:

- ``run_reference``: the program run op by op with PyTorch (the CPU path and the fake kernel);
- ``program``: the region in SSA form, one sympy expression per step over the kernel operands
  and earlier steps, from which the Triton printer emits the forward kernel and sympy's
  derivatives (chained step by step) the backward;
- ``describe``: the text shown next to the emitted source in reports.

Values are numbered: the inputs first, then one value per step in order.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import sympy
import torch

from codegen.sym import (
    SUPPORTED_FLOAT_DTYPES,
    Kind,
    SymValue,
    kind_of_dtype,
    pointwise_expression,
)


class UnsupportedRegion(ValueError):
    """The region holds something the emitter cannot express; the message names the node."""


# View ops are applied to the input tensors with PyTorch before the kernel runs (they move
# no data); they may only appear on inputs or on other views of inputs.
VIEW_OPS = {
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.squeeze.default",
    "aten.view.default",
    "aten.reshape.default",
    "aten._unsafe_view.default",
    "aten.expand.default",
    "aten.permute.default",
    "aten.transpose.int",
    "aten.t.default",
    "aten.slice.Tensor",
    "aten.select.int",
    "aten.alias.default",
}

_IDENTITY_OPS = {"aten.clone.default", "aten.detach.default", "aten.lift_fresh_copy.default"}


def op_from_name(name: str) -> torch._ops.OpOverload:
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


@dataclass(frozen=True)
class Ref:
    """An argument that is a value of the region (an input or an earlier step)."""

    index: int


@dataclass(frozen=True)
class DTypeArg:
    name: str  # "float16", ...

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


def _encode(arg, values: dict, node_name: str):
    if isinstance(arg, torch.fx.Node):
        if arg not in values:
            raise UnsupportedRegion(f"node {node_name!r} reads {arg.name!r}, which is not an input of the region")
        return Ref(values[arg])
    if isinstance(arg, torch.dtype):
        return DTypeArg(str(arg).removeprefix("torch."))
    if isinstance(arg, (list, tuple)):
        return tuple(_encode(a, values, node_name) for a in arg)
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise UnsupportedRegion(f"node {node_name!r} has an argument the emitter cannot express: {arg!r}")


def _to_json(arg):
    if isinstance(arg, Ref):
        return {"value": arg.index}
    if isinstance(arg, DTypeArg):
        return {"dtype": arg.name}
    if isinstance(arg, tuple):
        return [_to_json(a) for a in arg]
    return arg


def _from_json(arg):
    if isinstance(arg, dict):
        return Ref(arg["value"]) if "value" in arg else DTypeArg(arg["dtype"])
    if isinstance(arg, list):
        return tuple(_from_json(a) for a in arg)
    return arg


def _decode(arg, values):
    """Arguments for running a step: refs become the values they name (tensors or symbols)."""
    if isinstance(arg, Ref):
        return values[arg.index]
    if isinstance(arg, DTypeArg):
        return arg.dtype
    if isinstance(arg, tuple):
        return [_decode(a, values) for a in arg]
    return arg


def _symbol(name: str, kind: Kind) -> sympy.Symbol:
    return sympy.Symbol(name, **{Kind.FLOAT: {"real": True}, Kind.INT: {"integer": True}, Kind.BOOL: {}}[kind])


@dataclass(frozen=True)
class Program:
    """A region as assignments: ``steps`` are (symbol, value) in order, ``outputs`` the values
    (symbols) returned."""

    operands: tuple[sympy.Symbol, ...]
    steps: tuple[tuple[sympy.Symbol, SymValue], ...]
    outputs: tuple[SymValue, ...]

    def kind_of(self, symbol: sympy.Symbol) -> Kind:
        """The kind a symbol was made with (``_symbol``): integer, real, or neither (bool)."""
        if symbol.is_integer:
            return Kind.INT
        return Kind.FLOAT if symbol.is_real else Kind.BOOL


@dataclass(frozen=True)
class Step:
    op: str  # qualified overload name, e.g. "aten.add.Tensor"
    args: tuple
    kwargs: tuple  # sorted (name, encoded value) pairs
    name: str  # the fx node it came from, for messages and reports

    @property
    def is_view(self) -> bool:
        return self.op in VIEW_OPS


@dataclass(frozen=True)
class Region:
    input_dtypes: tuple[str, ...]
    input_names: tuple[str, ...]
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_graph(cls, gm: torch.fx.GraphModule) -> Region:
        """The region of a GraphModule whose placeholders are its inputs and whose output
        lists the values the region returns (as ``make_fx`` or ``extract_region`` make)."""
        values: dict[torch.fx.Node, int] = {}
        input_dtypes, input_names, steps, outputs = [], [], [], []
        for node in gm.graph.find_nodes(op="placeholder"):  # inputs are values 0..n-1
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UnsupportedRegion(f"input {node.name!r} is not a tensor; pass scalars as constants")
            _check_dtype(val.dtype, node.name)
            values[node] = len(values)
            input_dtypes.append(str(val.dtype).removeprefix("torch."))
            input_names.append(node.name)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "call_function":
                steps.append(_step_of(node, values))
                values[node] = len(values)
            elif node.op == "output":
                for out in _flat(node.args[0]):
                    if not isinstance(out, torch.fx.Node):
                        raise UnsupportedRegion(f"region output {out!r} is not a tensor computed by the region")
                    outputs.append(values[out])
            else:
                raise UnsupportedRegion(
                    f"node {node.name!r} ({node.op} {node.target}) cannot be part of a pointwise region; "
                    "tensors the region reads must be its inputs"
                )
        region = cls(tuple(input_dtypes), tuple(input_names), tuple(steps), tuple(outputs))
        region.check()
        return region

    @classmethod
    @functools.lru_cache(maxsize=256)
    def from_spec(cls, spec: str) -> Region:
        data = json.loads(spec)
        steps = tuple(
            Step(s["op"], _from_json(s["args"]), tuple((k, _from_json(v)) for k, v in s["kwargs"]), s["name"])
            for s in data["steps"]
        )
        return cls(tuple(data["input_dtypes"]), tuple(data["input_names"]), steps, tuple(data["outputs"]))

    def to_spec(self) -> str:
        return json.dumps(
            {
                "input_dtypes": self.input_dtypes,
                "input_names": self.input_names,
                "steps": [
                    {"op": s.op, "args": _to_json(s.args), "kwargs": [[k, _to_json(v)] for k, v in s.kwargs], "name": s.name}
                    for s in self.steps
                ],
                "outputs": self.outputs,
            },
            separators=(",", ":"),
        )

    # ---- checks ---------------------------------------------------------------------------

    def check(self) -> None:
        """Views only on inputs; outputs are values the region computes; every op has an
        expression (shapes are checked by ``check_shapes``, given inputs)."""
        n_inputs = len(self.input_dtypes)
        is_view_of_input = [True] * n_inputs
        for step in self.steps:
            refs = _references(step.args) + _references([v for _, v in step.kwargs])
            if step.is_view:
                if not all(is_view_of_input[r] for r in refs):
                    raise UnsupportedRegion(
                        f"node {step.name!r} ({step.op}) is a view of a value computed inside the region; "
                        "only the region's inputs may be viewed (move the view before the region)"
                    )
            is_view_of_input.append(step.is_view)
        if not self.outputs:
            raise UnsupportedRegion("the region returns nothing")
        for out in self.outputs:
            if is_view_of_input[out]:
                raise UnsupportedRegion(
                    f"region output {self.value_name(out)!r} is an input or a view of one; a kernel only "
                    "writes values it computes"
                )
        self.value_dtypes()  # runs the program on meta tensors: catches ops with bad arguments
        self.program()  # every op as an expression, or UnsupportedRegion naming the node

    def value_name(self, index: int) -> str:
        n_inputs = len(self.input_dtypes)
        return self.input_names[index] if index < n_inputs else self.steps[index - n_inputs].name

    # ---- reference ------------------------------------------------------------------------

    def run_values(self, inputs) -> list:
        values = list(inputs)
        for step in self.steps:
            op = op_from_name(step.op)
            args = _decode(step.args, values)
            kwargs = {k: _decode(v, values) for k, v in step.kwargs}
            values.append(op(*args, **kwargs))
        return values

    def run_reference(self, inputs) -> list[torch.Tensor]:
        """The region's outputs computed op by op with PyTorch (eager semantics)."""
        values = self.run_values(inputs)
        return [values[i].contiguous() for i in self.outputs]

    def apply_views(self, inputs) -> tuple[list[torch.Tensor], list[int]]:
        """The kernel operands: the inputs and their views that pointwise steps read, with
        the value index of each."""
        values = list(inputs)
        for step in self.steps:
            if not step.is_view:
                values.append(None)
                continue
            op = op_from_name(step.op)
            values.append(op(*_decode(step.args, values), **{k: _decode(v, values) for k, v in step.kwargs}))
        operands = self.operand_indices()
        return [values[i] for i in operands], operands

    @functools.cache
    def operand_indices(self) -> list[int]:
        """Values that pointwise steps read and that are inputs or views of inputs."""
        n_inputs = len(self.input_dtypes)
        computed = {n_inputs + k for k, s in enumerate(self.steps) if not s.is_view}
        used = []
        for step in self.steps:
            if step.is_view:
                continue
            for r in _references(step.args) + _references([v for _, v in step.kwargs]):
                if r not in computed and r not in used:
                    used.append(r)
        return sorted(used)

    @functools.cache
    def operand_roots(self) -> tuple[int, ...]:
        """For each kernel operand, the region input it is (a view of)."""
        n_inputs = len(self.input_dtypes)
        root = list(range(n_inputs))
        for step in self.steps:
            refs = _references(step.args)
            root.append(root[refs[0]] if step.is_view else -1)
        return tuple(root[i] for i in self.operand_indices())

    @functools.cache
    def value_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtype of every value, from running the program on meta tensors (each input
        as a one-element tensor of its rank-0 shape: dtypes do not depend on shapes)."""
        inputs = [torch.empty((), dtype=getattr(torch, d), device="meta") for d in self.input_dtypes]
        values = list(inputs)
        for step in self.steps:
            op = op_from_name(step.op)
            args = _decode(step.args, values)
            kwargs = {k: _decode(v, values) for k, v in step.kwargs}
            if step.is_view:
                values.append(values[_references(step.args)[0]])  # a view keeps its dtype
                continue
            try:
                out = op(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure is the user's region
                raise UnsupportedRegion(f"node {step.name!r} ({step.op}) fails on its inputs: {exc}") from None
            if not isinstance(out, torch.Tensor):
                raise UnsupportedRegion(f"node {step.name!r} ({step.op}) does not return one tensor")
            _check_dtype(out.dtype, step.name)
            values.append(out)
        return tuple(v.dtype for v in values)

    # ---- symbolic form ------------------------------------------------------------------

    @functools.cache
    def program(self) -> Program:
        """The region in SSA form: a symbol per kernel operand (``a0, a1, ...``) and per
        pointwise step (``v0, v1, ...``), each step an expression of earlier symbols.

        One symbol per step keeps sympy from simplifying across ops: it would rewrite
        ``sqrt(x) ** 2`` as ``x`` and ``exp(log(x))`` as ``x``, which is wrong for negative x.
        """
        dtypes = self.value_dtypes()
        operands = self.operand_indices()
        values: dict[int, SymValue] = {}
        operand_symbols = []
        for k, index in enumerate(operands):
            symbol = _symbol(f"a{k}", kind_of_dtype(dtypes[index]))
            operand_symbols.append(symbol)
            values[index] = SymValue(symbol, kind_of_dtype(dtypes[index]))
        n_inputs = len(self.input_dtypes)
        steps = []
        for k, step in enumerate(self.steps):
            index = n_inputs + k
            if step.is_view:
                continue
            args = _decode(step.args, values)
            kwargs = {key: _decode(v, values) for key, v in step.kwargs}
            try:
                value = pointwise_expression(step.op, args, kwargs, dtypes[index])
            except ValueError as exc:
                raise UnsupportedRegion(f"node {step.name!r} ({step.op}): {exc}") from None
            if isinstance(value.expr, sympy.Symbol):  # a copy: the value it copies
                values[index] = value
                continue
            symbol = _symbol(f"v{len(steps)}", value.kind)
            steps.append((symbol, value))
            values[index] = SymValue(symbol, value.kind)
        return Program(tuple(operand_symbols), tuple(steps), tuple(values[i] for i in self.outputs))

    def iteration(self, inputs) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """The kernel operands for these inputs and the shape the kernel iterates over."""
        operands, _ = self.apply_views(inputs)
        return operands, tuple(torch.broadcast_shapes(*(o.shape for o in operands)))

    def check_shapes(self, inputs) -> None:
        """``check_output_shapes`` for these inputs (real, fake or meta tensors)."""
        operands, shape = self.iteration(inputs)
        self.check_output_shapes([tuple(o.shape) for o in operands], shape)

    def check_output_shapes(self, operand_shapes: list[tuple[int, ...]], shape: tuple[int, ...]) -> None:
        """Every output must cover the whole iteration space: a kernel writes each output at
        every index."""
        shapes = dict(zip(self.operand_indices(), operand_shapes))
        n_inputs = len(self.input_dtypes)
        for k, step in enumerate(self.steps):
            if step.is_view:
                continue
            refs = [r for r in _references(step.args) + _references([v for _, v in step.kwargs]) if r in shapes]
            shapes[n_inputs + k] = tuple(torch.broadcast_shapes(*(shapes[r] for r in refs))) if refs else ()
        for out in self.outputs:
            if shapes[out] != shape:
                raise UnsupportedRegion(
                    f"region output {self.value_name(out)!r} has shape {list(shapes[out])}, smaller than the "
                    f"region's iteration shape {list(shape)}; return it from a separate region"
                )

    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        dtypes = self.value_dtypes()
        return tuple(dtypes[i] for i in self.outputs)

    def operand_dtypes(self) -> tuple[torch.dtype, ...]:
        dtypes = self.value_dtypes()
        return tuple(dtypes[i] for i in self.operand_indices())

    def describe(self) -> str:
        """One line per step, in the style of the graph listings."""
        lines = [f"inputs: {', '.join(f'{n}: {d}' for n, d in zip(self.input_names, self.input_dtypes))}"]
        n_inputs = len(self.input_dtypes)
        names = list(self.input_names) + [s.name for s in self.steps]
        for k, step in enumerate(self.steps):
            args = ", ".join(_describe_arg(a, names) for a in step.args)
            kwargs = "".join(f", {key}={_describe_arg(v, names)}" for key, v in step.kwargs)
            lines.append(f"{names[n_inputs + k]} = {step.op}({args}{kwargs})")
        lines.append(f"outputs: {', '.join(names[i] for i in self.outputs)}")
        return "\n".join(lines)


def _flat(arg) -> list:
    if isinstance(arg, (list, tuple)):
        return [x for a in arg for x in _flat(a)]
    return [arg]


def _references(args) -> list[int]:
    refs = []
    for a in args:
        if isinstance(a, Ref):
            refs.append(a.index)
        elif isinstance(a, (list, tuple)):
            refs.extend(_references(a))
    return refs


def _describe_arg(arg, names) -> str:
    if isinstance(arg, Ref):
        return names[arg.index]
    if isinstance(arg, DTypeArg):
        return f"torch.{arg.name}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_describe_arg(a, names) for a in arg) + "]"
    if isinstance(arg, float) and not math.isfinite(arg):
        return f"float('{arg}')"
    return repr(arg)


def _check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype in SUPPORTED_FLOAT_DTYPES or dtype in (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8):  # fmt: skip
        return
    raise UnsupportedRegion(
        f"node {name!r} has dtype {dtype}, which the Triton emitter does not support "
        "(supported: float16, bfloat16, float32, float64, bool and integer types)"
    )


def overload_name(target: torch._ops.OpOverload) -> str:
    """"aten.add.Tensor" for torch.ops.aten.add.Tensor."""
    return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"


def _step_of(node: torch.fx.Node, values: dict) -> Step:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise UnsupportedRegion(
            f"node {node.name!r} calls {getattr(target, '__name__', target)}, not an ATen op; "
            "capture the region with make_fx or torch.export first"
        )
    name = overload_name(target)
    from codegen.sym import POINTWISE_OPS

    if name not in POINTWISE_OPS and name not in VIEW_OPS and name not in _IDENTITY_OPS:
        raise UnsupportedRegion(
            f"node {node.name!r} ({name}) is not an elementwise op the emitter can express; "
            "end the region before it"
        )
    kwargs = dict(node.kwargs)
    if name == "aten._to_copy.default":
        device = kwargs.pop("device", None)
        val = node.meta.get("val")
        src = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if device is not None and src is not None and torch.device(device) != src.device:
            raise UnsupportedRegion(f"node {node.name!r} moves data between devices; end the region before it")
        for key in ("layout", "pin_memory", "memory_format", "non_blocking"):
            kwargs.pop(key, None)
        if val is not None:
            kwargs["dtype"] = val.dtype
    if name in _IDENTITY_OPS:  # a copy inside a region is the value itself
        return Step("aten.clone.default", _encode((node.args[0],), values, node.name), (), node.name)
    return Step(
        name,
        _encode(node.args, values, node.name),
        tuple(sorted((k, _encode(v, values, node.name)) for k, v in kwargs.items())),
        node.name,
    )


def extract_region(nodes) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], list[torch.fx.Node]]:
    """A GraphModule of ``nodes`` (fx nodes of one graph), with a placeholder per value they
    read from outside and an output per node used outside them; returns it with the outside
    inputs and the region's outputs, in order."""
    nodes = list(nodes)
    if not nodes:
        raise UnsupportedRegion("the region is empty")
    order = {n: k for k, n in enumerate(nodes[0].graph.nodes)}
    nodes.sort(key=order.__getitem__)
    members = set(nodes)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs = []
    for node in nodes:
        if node.op != "call_function":
            raise UnsupportedRegion(f"node {node.name!r} ({node.op}) cannot be part of a pointwise region")
        for arg in node.all_input_nodes:
            if arg not in members and arg not in env:
                placeholder = graph.placeholder(arg.name)
                placeholder.meta["val"] = arg.meta.get("val")
                env[arg] = placeholder
                inputs.append(arg)
        env[node] = graph.node_copy(node, env.__getitem__)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    if not outputs:
        raise UnsupportedRegion("nothing outside the region uses its values")
    graph.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph), inputs, outputs
