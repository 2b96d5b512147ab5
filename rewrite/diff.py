"""Graphs as text, one line per node, and the diff of two of them.

    x: f32[s77, 5, 16]                                      (an input)
    linear = aten.linear(ms_layer_norm_out, fc.weight, fc.bias) -> f32[s77, 5, 32]   # fc
    return (add_2,)

Parameters appear by name inside the calls that read them; the nodes torch.export adds for
its own checks (input guards, metadata assertions) are left out.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from rewrite.graph import ASSERT_METADATA, format_shape, module_path, op_name



def _arg_text(arg) -> str:
    if isinstance(arg, fx.Node):
        return arg.target if arg.op == "get_attr" else arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_text(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, torch.dtype):
        return str(arg).replace("torch.", "")
    return repr(arg)


def node_line(node: fx.Node) -> str | None:
    """The node as one line of text, or None for nodes the listing leaves out."""
    if node.op == "placeholder":
        shape = format_shape(node)
        return f"{node.name}: {shape}" if shape else node.name
    if node.op == "output":
        return f"return {_arg_text(node.args[0])}"
    if node.op == "get_attr" or node.op == "call_module":
        return None
    if node.target is ASSERT_METADATA:
        return None
    args = [_arg_text(a) for a in node.args] + [f"{k}={_arg_text(v)}" for k, v in node.kwargs.items()]
    if node.target is operator.getitem:
        text = f"{node.name} = {_arg_text(node.args[0])}[{node.args[1]}]"
    else:
        text = f"{node.name} = {op_name(node)}({', '.join(args)})"
    shape = format_shape(node)
    where = module_path(node)
    return text + (f" -> {shape}" if shape else "") + (f"   # {where}" if where else "")


def graph_lines(gm: fx.GraphModule) -> list[str]:
    return [line for line in (node_line(n) for n in gm.graph.nodes) if line is not None]


@dataclass
class DiffRow:
    """One row of a side-by-side diff: ``tag`` is 'equal', 'delete', 'insert' or 'replace'."""

    tag: str
    left: str | None
    right: str | None


def _defined_name(line: str) -> str:
    """The node a listing line defines: 'linear' for 'linear = ...', 'x' for input 'x: f32[..]'."""
    if line.startswith("return "):
        return "return"
    return line.split(" = ", 1)[0] if " = " in line else line.split(":", 1)[0]


def _pair_block(left: list[str], right: list[str]) -> list[DiffRow]:
    """Rows for a block of differing lines: a line is paired with the line of the other side
    that defines the same node name (the node changed); the rest are removals and additions."""
    rows = []
    names = difflib.SequenceMatcher(a=[_defined_name(x) for x in left], b=[_defined_name(x) for x in right], autojunk=False)
    for tag, i1, i2, j1, j2 in names.get_opcodes():
        if tag == "equal":
            rows += [DiffRow("replace", left[i], right[j]) for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        rows += [DiffRow("delete", left[i], None) for i in range(i1, i2)]
        rows += [DiffRow("insert", None, right[j]) for j in range(j1, j2)]
    return rows


def diff_rows(before: fx.GraphModule, after: fx.GraphModule) -> list[DiffRow]:
    a, b = graph_lines(before), graph_lines(after)
    rows = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [DiffRow("equal", line, line) for line in a[i1:i2]]
        else:
            rows += _pair_block(a[i1:i2], b[j1:j2])
    return rows


def graph_diff(before: fx.GraphModule, after: fx.GraphModule, context: int | None = 3) -> str:
    """Unified diff of the two graphs: '-' nodes removed or changed, '+' nodes added or
    changed, ' ' unchanged (``context`` unchanged lines around each change; None for all)."""
    a, b = graph_lines(before), graph_lines(after)
    if context is None:
        context = max(len(a), len(b))
    lines = difflib.unified_diff(a, b, fromfile="before", tofile="after", n=context, lineterm="")
    return "\n".join(lines) or "(the graphs are the same)"
