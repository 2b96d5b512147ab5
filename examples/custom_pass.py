"""A pass of your own: replace x * sigmoid(x) written by hand with SiLU, as a rule table.

    python examples/custom_pass.py
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from rewrite import Pass, PassResult, Rule, Rules, op, optimize, register_pass, replace_by_example, var

aten = torch.ops.aten
x = var("x")


@register_pass
@dataclass(frozen=True)
class FuseSwish(Pass):
    """Replace x * sigmoid(x) by one SiLU call (exact)."""

    name: ClassVar[str] = "fuse_swish"
    rules: ClassVar[Rules] = Rules(
        Rule(
            op(aten.mul, x, op(aten.sigmoid, x), commutative=True),  # either operand order
            lambda m: replace_by_example(m, aten.silu.default, m["x"]),
            what="x * sigmoid(x)",
        ),
    )

    def run(self, gm, ctx) -> PassResult:
        return self.rules.apply(gm)  # every change, and the sigmoids left unused removed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(h))


x_in = torch.randn(8, 16)
m = optimize(Net(), ["fuse_swish", "approx_bp"], (x_in,))  # then approx_bp makes the SiLU 2-bit
print(m.report)
