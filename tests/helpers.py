"""Shared test helpers: an independent eager reference of Approx-BP's activations, model
builders with non-trivial norm parameters, and small comparison utilities."""

from __future__ import annotations

import operator

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rewrite import Change, Pass, PassResult, zoo
from rewrite.graph import call_function

aten = torch.ops.aten

# Constants as REFERENCES.md gives them (deliberately not imported from the implementation).
GELU_A = (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286)
GELU_C = (-3.1858810036855245, -0.001178821281161997, 3.190832613414926)
SILU_A = (-0.04060357190528599, 1.080925428529668, -0.040321856624382146)
SILU_C = (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708)


def step_slope(x: torch.Tensor, a, c) -> torch.Tensor:
    """h'(x) for h(x) = sum a_i max(x - c_i, 0), in float64."""
    xd = x.double()
    return sum(ai * (xd > ci).double() for ai, ci in zip(a, c))


class _StepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_fn, a, c):
        ctx.save_for_backward(x)
        ctx.a, ctx.c = a, c
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (grad.double() * step_slope(x, ctx.a, ctx.c)).to(grad.dtype), None, None, None


class StepDerivativeReference(TorchFunctionMode):
    """Inside this mode, F.gelu / F.silu (however called) keep their forward and take the
    step-function derivative in the backward: what approx_bp must compute, written plainly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.gelu, torch._C._nn.gelu):
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            return _StepBackward.apply(args[0], lambda t: F.gelu(t, approximate=approximate), GELU_A, GELU_C)
        if func is F.silu:
            return _StepBackward.apply(args[0], F.silu, SILU_A, SILU_C)
        return func(*args, **kwargs)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm's affine parameters values far from the (1, 0) default, so folding them
    into the next layer is tested for real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm, zoo.RMSNorm)) and weight is not None:
                weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.5)
    return model


def build(name: str, dtype: torch.dtype = torch.float32, batch: int = 3):
    model, inputs = zoo.build(name, batch=batch)
    randomize_norms(model)
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return model, inputs


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


ROUNDING = {torch.float32: 1e-5, torch.float16: 1e-2, torch.float64: 1e-12}


class WritesMarker:
    """Unpickling this object creates ``path`` (what a malicious checkpoint would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class RebuildGelu(Pass):
    """Replaces every GELU by a new, identical GELU node: an exact rewrite that changes the graph."""

    name: ClassVar[str] = "rebuild_gelu"

    def run(self, gm, ctx):
        result = PassResult()
        for node in list(gm.graph.nodes):
            if node.target is aten.gelu.default:
                with gm.graph.inserting_before(node):
                    new = call_function(gm.graph, aten.gelu.default, node.args, dict(node.kwargs), like=node)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                result.changes.append(Change(node.name, "", "aten.gelu", "aten.gelu"))
        return result


def views_and_a_two_output_op(x, w):
    y = torch.mm(x, w)  # 4x5 float32: 80 bytes
    t = y.t()  # a view of y: an output, so y lasts to the end
    first, _ = torch.split(y, 2, dim=0)  # views of y
    z = first * 2  # 2x5: 40 bytes
    values, indices = torch.max(t, dim=1)  # two outputs: 5 float32 (20 bytes), 5 int64 (40 bytes)
    out = values + z.sum()  # sum: 4 bytes; out: 20 bytes
    return out, t, indices


def node_of(gm, target, index=None):
    found = [n for n in gm.graph.nodes if n.target is target]
    if index is not None:
        found = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0] is found[0] and n.args[1] == index]
    assert len(found) == 1, (target, index, found)
    return found[0]


@dataclass(frozen=True)
class ApproximatePass(Pass):
    """Base of the tests' passes that declare approximate outputs and gradients."""

    @property
    def exact_forward(self):
        return False

    @property
    def exact_backward(self):
        return False
