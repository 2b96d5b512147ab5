"""approx_bp: approximate-backward activations and memory-sharing norms (Approx-BP).

- GELU and SiLU (module, functional, or written out: ``0.5 * x * (1 + tanh(...))``,
  ``x * 0.5 * (1 + erf(x / sqrt(2)))``, ``x * sigmoid(x)``) become ``rewrite.regelu2`` /
  ``rewrite.resilu2``: exact forward, a step-derivative backward from 2-bit codes (2 bits
  kept per element instead of the input). Outputs are exact; gradients approximate, with the
  error measured and reported.
- LayerNorm and RMSNorm (``nn``/functional forms, the hand-written LLaMA/T5/Gemma RMSNorm)
  whose every reader is a linear layer (GPT-2's ``Conv1D`` too) become ``rewrite.ms_layer_norm``
  / ``ms_rms_norm``, saving their output (which the linear layers save anyway) instead of their
  input; gamma/beta are folded into those layers (``rewrite.folding``). Any other reader (a
  dropout, an activation, the model's output) leaves the norm alone, with the reason reported.
- Quality guard (``min_cosine``): the step derivative's error compounds with depth (49 SiLUs
  can leave a gradient cosine near 0.1). Below ``min_cosine``, ``rewrite.guard`` keeps exact
  the fewest activations, worst first by the error their step derivative puts into the
  gradient at their input per byte saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from rewrite.folding import LINEAR, fold_input_affine, fold_problem, linear_readers, linear_weight
from rewrite.graph import (
    drop_unused_attributes, format_shape, get_attr_value, is_get_attr, is_number, module_path,
    out_of_place_problem, replace_by_example, tensor_value, users,
)  # fmt: skip
from rewrite.guard import Ranked, derivative_error, keep_fewest_exact
from rewrite.module import clone_graph_module
from rewrite.pass_infra import Pass, PassContext, PassResult, option
from rewrite.pattern import CASTS, Match, Rule, Rules, any_of, maybe_cast, number, op, var
from rewrite.verify import gradients_at

aten, regelu2, resilu2 = torch.ops.aten, torch.ops.rewrite.regelu2.default, torch.ops.rewrite.resilu2.default
x = var("x")


def _mul(a, b, **kwargs):  # a * b, in either order
    return op(aten.mul.Tensor, a, b, commutative=True, **kwargs)


def _one_plus(a, **kwargs):  # 1 + a, in either order
    return op(aten.add.Tensor, a, number(1.0), commutative=True, alpha=1, **kwargs)


# -- activations ---------------------------------------------------------------------------


def _step_activation(new_op, approximate: str | None = None):
    """The rule putting ``new_op`` (exact forward, 2-bit backward) in place of an activation of
    x; its ``step(match)`` gives x, the replacement and the exact activation (functions of x)."""

    def step(m: Match):
        if new_op is regelu2:
            form = approximate or m["approximate"]
            return m["x"], lambda t: regelu2(t, approximate=form)[0], lambda t: aten.gelu.default(t, approximate=form)
        return m["x"], lambda t: new_op(t)[0], aten.silu.default

    def rewrite(m: Match):
        problem = _activation_problem(m.root, m["x"])
        if problem:
            return m.skip(problem)
        m.note(f"{format_shape(m.root)}: backward keeps 2 bits per element instead of {tensor_value(m['x']).element_size() * 8}")
        x, replacement, _ = step(m)
        return replace_by_example(m, replacement, x)

    rewrite.step = step
    return rewrite


def _half_x_times(factor):  # 0.5 * x * factor, associated either way
    return any_of(_mul(_mul(x, number(0.5)), factor), _mul(number(0.5), _mul(x, factor)))


_CUBE = any_of(op(aten.pow.Tensor_Scalar, x, 3), _mul(_mul(x, x), x))
_SQRT_2_OVER_PI = number(math.sqrt(2 / math.pi))
_TANH_ARGUMENT = any_of(  # sqrt(2/pi) * (x + 0.044715 x^3), or x * sqrt(2/pi) * (1 + 0.044715 x x) (HF's FastGELU)
    _mul(_SQRT_2_OVER_PI, op(aten.add.Tensor, x, _mul(number(0.044715), _CUBE), commutative=True, alpha=1)),
    _mul(_mul(x, _SQRT_2_OVER_PI), _one_plus(_mul(_mul(x, number(0.044715)), x))),
)
_ERF_ARGUMENT = any_of(op(aten.div.Tensor, x, number(math.sqrt(2))), _mul(x, number(math.sqrt(0.5))))
_IN_PLACE = (aten.gelu_.default, aten.silu_.default)
_STEP_OPS = ("rewrite.regelu2", "rewrite.resilu2")

GELU = Rules(
    Rule(op((aten.gelu.default, aten.gelu_.default), x, approximate=var("approximate")), _step_activation(regelu2)),
    Rule(_half_x_times(_one_plus(op(aten.tanh.default, _TANH_ARGUMENT))), _step_activation(regelu2, "tanh"),
         what="0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))"),
    Rule(_half_x_times(_one_plus(op(aten.erf.default, _ERF_ARGUMENT))), _step_activation(regelu2, "none"),
         what="0.5 * x * (1 + erf(x / sqrt(2)))"),
)  # fmt: skip
SILU = Rules(
    Rule(op((aten.silu.default, aten.silu_.default), x), _step_activation(resilu2)),
    Rule(_mul(x, op(aten.sigmoid.default, x)), _step_activation(resilu2), what="x * sigmoid(x)"),
)


def _activation_problem(node: fx.Node, x: fx.Node) -> str | None:
    val = tensor_value(x) if isinstance(x, fx.Node) else None
    if val is None or not val.is_floating_point():
        return f"input is not a floating-point tensor ({format_shape(x) if isinstance(x, fx.Node) else type(x).__name__})"
    return out_of_place_problem(node, x) if node.target in _IN_PLACE else None  # the rewrite computes out of place


# -- norms ---------------------------------------------------------------------------------

_GAMMA = maybe_cast(var("weight", where=is_get_attr))
_SQUARE = any_of(op(aten.pow.Tensor_Scalar, maybe_cast(x), 2, name="square"), op(aten.mul.Tensor, maybe_cast(x), maybe_cast(x), name="square"))
_SHIFTED = op(aten.add.Tensor, op(aten.mean.dim, _SQUARE, var("dims"), True), var("eps", where=is_number), commutative=True)
_NORMED = any_of(_mul(maybe_cast(x), op(aten.rsqrt.default, _SHIFTED)), op(aten.div.Tensor, maybe_cast(x), op(aten.sqrt.default, _SHIFTED)))
_SCALED = _mul(any_of(_one_plus(_GAMMA, name="one_plus"), _GAMMA), maybe_cast(_NORMED))  # Gemma scales by 1 + weight
HAND_WRITTEN_RMS_NORM = any_of(*(op(aten.type_as.default, p, var()) for p in (_SCALED, _NORMED)), maybe_cast(_SCALED), maybe_cast(_NORMED))


def _hand_written_rms_norm(m: Match):
    x_val, square = tensor_value(m["x"]), tensor_value(m["square"])
    if x_val is None or square is None or list(m["dims"]) not in ([-1], [x_val.dim() - 1]):
        return None
    if any(larger and m.root in larger.nodes for larger in map(HAND_WRITTEN_RMS_NORM.match, users(m.root))):
        return None  # part of a larger norm (its weight, a cast): that one is the match
    if torch.promote_types(square.dtype, x_val.dtype) != square.dtype:
        # ms_rms_norm computes in at least the input's precision: the result would differ.
        return m.skip(f"it computes in {square.dtype} on a {x_val.dtype} input; the rewrite would compute in {x_val.dtype}")
    # Inner values used outside the norm stay in the graph (a cast of x alone costs nothing).
    kept = [n.name for n in m.escaping() if not (n.target in CASTS and n.args[0] is m["x"])]
    return _share_memory(m, "rms", [int(x_val.shape[-1])], float(m["eps"]), kept)


NORMS = Rules(
    Rule(op(aten.layer_norm.default, x, var("shape"), weight=var("weight"), bias=var("bias"), eps=var("eps")),
         lambda m: _share_memory(m, "layer", list(m["shape"]), m["eps"])),
    Rule(op(aten.rms_norm.default, x, var("shape"), weight=var("weight"), eps=var("eps")),
         lambda m: _share_memory(m, "rms", list(m["shape"]), m["eps"])),
    Rule(HAND_WRITTEN_RMS_NORM, _hand_written_rms_norm, what="hand-written RMSNorm"),
)  # fmt: skip


def _share_memory(m: Match, kind: str, shape: list[int], eps: float | None, kept: Sequence[str] = ()):
    """The memory-sharing norm in place of ``m`` (bound: x, weight, bias), its affine parameters
    folded into the linear layers reading it; or why it must stay."""
    gm, weight, bias = m.root.graph.owning_module, m.get("weight"), m.get("bias")
    problem = _norm_problem(m.root, m["x"])
    linears, problem = ([], problem) if problem else linear_readers(m.root)
    problem = problem or fold_problem(gm, shape, weight, bias, linears)
    if problem:
        return m.skip(problem)
    gamma = get_attr_value(gm, weight).detach().double().reshape(-1) if weight is not None else None
    gamma = gamma + 1 if "one_plus" in m.bindings else gamma
    for linear in linears:
        fold_input_affine(gm, linear, gamma, get_attr_value(gm, bias) if bias is not None else None)
    names = ", ".join(sorted({module_path(lin.root) or lin.root.name for lin in linears}))
    m.note(
        f"saves its output, shared with {names}" + ("; affine parameters folded into them" if weight is not None or bias is not None else "")
        + (f"; its inner values {', '.join(kept)} are used elsewhere too and stay" if kept else "")
    )  # fmt: skip
    ms_norm = torch.ops.rewrite.ms_layer_norm.default if kind == "layer" else torch.ops.rewrite.ms_rms_norm.default
    return replace_by_example(m, lambda t: ms_norm(t, shape, eps)[0], m["x"])


def _norm_problem(root: fx.Node, x: fx.Node) -> str | None:
    x_val, out_val = tensor_value(x), tensor_value(root)
    if x_val is None or not x_val.is_floating_point():
        return "input is not a floating-point tensor"
    if out_val is None or out_val.dtype != x_val.dtype:
        return "its output dtype differs from its input dtype"
    return "its weight broadcasts the output to another shape than the input's" if out_val.shape != x_val.shape else None


# -- the pass ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApproxBP(Pass):
    """Approx-BP: GELU/SiLU with 2-bit approximate backward, LayerNorm/RMSNorm that share memory with the next linear."""

    name: ClassVar[str] = "approx_bp"
    gelu: bool = option(True, "replace GELU (exact and tanh form, also written out) by ReGELU2: exact forward, 2-bit step-derivative backward")
    silu: bool = option(True, "replace SiLU (also x * sigmoid(x)) by ReSiLU2: exact forward, 2-bit step-derivative backward")
    norms: bool = option(
        True, "replace LayerNorm/RMSNorm whose users are all linear layers by memory-sharing versions, folding gamma/beta into those layers"
    )
    min_cosine: float = option(
        0.9, "keep exact backward for the fewest activations (largest gradient error per byte saved first) that bring the whole-model "
        "gradient cosine on the example inputs to at least this (the error compounds with depth); 0 turns the guard off", ge=0, le=1,
    )  # fmt: skip

    @property
    def exact_backward(self) -> bool:
        return not (self.gelu or self.silu)

    def check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not (self.gelu or self.silu or self.norms):
            raise self.fail("gelu, silu and norms are all off, so there is nothing to do; turn one on")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        guard = None
        if self.min_cosine > 0 and (self.gelu or self.silu):
            rewrite = lambda trial, kept: [c.node for c in self._rewrite(trial, kept).changes if c.after in _STEP_OPS]  # noqa: E731
            original = clone_graph_module(gm)
            rank = lambda names: _rank(original, names, ctx)  # noqa: E731
            guard = keep_fewest_exact(original, rewrite, rank, ctx.example_args, ctx.example_kwargs,
                                      min_cosine=self.min_cosine, ranked_by="step-derivative error per byte saved")  # fmt: skip
        params = dict(gm.named_parameters(remove_duplicate=False))
        result = self._rewrite(gm, guard.kept if guard else {})
        result.figures = {
            "activations replaced": sum(c.after in _STEP_OPS for c in result.changes),
            "norms replaced": sum(c.after.startswith("rewrite.ms_") for c in result.changes),
            "linear layers folded into": sum(
                any(is_get_attr(p) and params.get(p.target) is not get_attr_value(gm, p) for p in (linear_weight(lin), lin.get("b")))
                for lin in filter(None, map(LINEAR.match, gm.graph.nodes))
            ),
        }
        if guard and guard.before is not None:
            result.figures.update({"gradient_cosine_before_guard": guard.before, "gradient_cosine": guard.after, "activations kept exact": len(guard.kept)})
        return result

    def _rewrite(self, gm: fx.GraphModule, kept_exact: Mapping[str, str] = {}) -> PassResult:
        """The rules on ``gm``, in place; the activations named in ``kept_exact`` are left alone
        with the reason given there."""
        read = [n for n in gm.graph.find_nodes(op="get_attr") if users(n)]
        rules = sum((table for on, table in ((self.gelu, GELU), (self.silu, SILU), (self.norms, NORMS)) if on), Rules())
        result = rules.leaving(kept_exact).apply(gm)
        drop_unused_attributes(gm, read)  # the folded norms' gamma and beta
        gm.recompile()
        return result


def _rank(gm: fx.GraphModule, replaced: Sequence[str], ctx: PassContext) -> list[Ranked]:
    """The replaced activations of ``gm`` (the graph before), scored by the relative error their
    step derivative puts into the gradient at their input (under the exact gradient from above,
    the final check's random projection of the outputs) per byte they save."""
    nodes = {n.name: n for n in gm.graph.nodes}
    steps = {name: _step_of(nodes[name]) for name in replaced}
    values, from_above = gradients_at(gm, ctx.example_args, ctx.example_kwargs, replaced, keep=[x.name for x, *_ in steps.values()])
    ranked = []
    for name in replaced:
        x_node, step, exact_activation = steps[name]
        # (An in-place one's input is seen after the mutation: a rough rank; the guard's bisection measures.)
        x = values[x_node.name]
        saved = x.numel() * x.element_size() - math.ceil(x.numel() / 4)  # its input, kept as 2-bit codes
        error = derivative_error(exact_activation, step, x, from_above[name])
        detail = f"relative error {error:.3g} in the gradient at its input, {saved} bytes saved"
        ranked.append(Ranked(name, math.inf if saved <= 0 else error / saved, detail))
    return ranked


def _step_of(node: fx.Node):
    """(x, replacement, exact activation) of the activation ``node`` the rules replace."""
    for rule in (GELU + SILU).rules:
        m = rule.pattern.match(node)
        if m is not None:
            return rule.rewrite.step(m)
    raise ValueError(f"{node.name} is no activation the rules replace")
