"""A pass that hands regions to codegen: every chain of elementwise ops becomes one kernel.

    python examples/fuse_pointwise.py

The pass only marks regions (``mark_region``); ``optimize(..., codegen=True)`` then replaces
each by one ``torch.ops.rewrite.pointwise`` op whose Triton kernels, forward and backward,
codegen emits from the region's ATen ops. On a machine without CUDA the op runs the region
op by op, so the numbers below are the same either way; the kernels run on a GPU.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite import Change, Pass, PassResult, grow_pointwise_region, mark_region, optimize, option, register_pass
from rewrite.graph import module_path, op_name


@register_pass
@dataclass(frozen=True)
class FusePointwise(Pass):
    """Mark every connected group of elementwise ops for codegen (exact)."""

    name: ClassVar[str] = "fuse_pointwise"
    min_ops: int = option(2, "smallest number of ops worth a kernel of their own")

    def run(self, gm, ctx) -> PassResult:
        result = PassResult()
        seen = set()
        for node in list(gm.graph.nodes):
            if node in seen:
                continue
            region = grow_pointwise_region(node)
            seen.update(region)
            if len(region) >= self.min_ops:
                label = f"fused_{len(result.changes)}"
                mark_region(region, label)
                ops = " -> ".join(op_name(n) for n in region)
                result.changes.append(Change(label, module_path(node), ops, "marked for codegen"))
        return result


class Block(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.gelu(self.fc(x) + self.bias) * 0.5 + x  # bias + activation + residual


if __name__ == "__main__":
    x = torch.randn(8, 64)
    m = optimize(Block(), ["fuse_pointwise"], (x,), codegen=True)
    print(m.report)
    print(m.after.code)
    kernel_source = next(k for k in m.kernels() if k.op == "rewrite.pointwise").sources["forward"]
    print(kernel_source)
