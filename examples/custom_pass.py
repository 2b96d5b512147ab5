"""A pass of your own: replace x * sigmoid(x) written by hand with SiLU, using a pattern.

    python examples/custom_pass.py
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from rewrite import Change, Pass, PassResult, optimize, register_pass
from rewrite.graph import call_function, module_path
from rewrite.pattern import Rule, op, var

aten = torch.ops.aten


def _swish_to_silu(gm):
    def rewrite(m) -> Change:
        node = m.root
        with gm.graph.inserting_before(node):
            silu = call_function(gm.graph, aten.silu.default, (m["x"],), like=node)
        node.replace_all_uses_with(silu)
        gm.graph.erase_node(node)
        return Change(node.name, module_path(node), "x * sigmoid(x)", "aten.silu")

    x = var("x")
    return Rule("swish", op(aten.mul.Tensor, x, op(aten.sigmoid.default, x), commutative=True), rewrite)


@register_pass
@dataclass(frozen=True)
class FuseSwish(Pass):
    """Replace x * sigmoid(x) by one SiLU call (exact)."""

    name: ClassVar[str] = "fuse_swish"

    def run(self, gm, ctx) -> PassResult:
        rule = _swish_to_silu(gm)
        result = PassResult()
        for node in list(gm.graph.nodes):
            change = rule.apply(node)  # a Change, or None where the pattern does not match
            if change is not None:
                result.changes.append(change)
        gm.graph.eliminate_dead_code()  # the sigmoid nodes left without users
        return result


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(h))


x = torch.randn(8, 16)
m = optimize(Net(), ["fuse_swish", "approx_bp"], (x,))  # then approx_bp makes the SiLU 2-bit
print(m.report)
