"""approx_bp: approximate-backward activations and memory-sharing norms (Approx-BP).

- GELU and SiLU (module or functional, exact or tanh GELU, or written out: ``0.5 * x * (1 +
  tanh(...))``, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, ``x * sigmoid(x)``) become
  ``rewrite.regelu2`` / ``rewrite.resilu2``: the forward is exactly the activation; the
  backward uses a step derivative from 2-bit codes, so the activation keeps 2 bits per element
  instead of a full copy of its input.
- LayerNorm and RMSNorm (``nn.LayerNorm``, ``F.layer_norm``, ``nn.RMSNorm``, ``F.rms_norm``
  and the hand-written LLaMA/T5/Gemma RMSNorm) whose every user is a linear layer (also GPT-2's
  ``Conv1D``: a view, then addmm) become ``rewrite.ms_layer_norm`` / ``ms_rms_norm``, which save
  their output (the tensor the linear layers save anyway) instead of their input. Their affine
  parameters are folded into those linear layers in float64 (W' = W diag(gamma), b' = b + W
  beta). A norm whose output is used by anything else (a dropout, an activation, the model's
  output) is left alone and the report says why.

Exactness: outputs equal the original's up to float rounding; gradients are approximate
when an activation was replaced (the report gives the measured error), exact otherwise.
Folding changes the parameters: the norm's gamma/beta disappear and the linear layers'
weights (and biases) are replaced by folded copies.

Quality guard (``min_cosine``): the step derivative's error compounds with depth (49 SiLUs
can leave a gradient cosine near 0.1). After the rules ran, the whole-model gradient cosine
against the graph before is measured on the example inputs (``rewrite.verify.compare``, the
final check's random projection). Below ``min_cosine``, one forward + backward of the graph
before ranks the replaced activations by the relative error their step derivative puts into
the gradient at their input per byte they save; a bisection, each step measured, finds how
few of the worst need their exact backward for the cosine to reach ``min_cosine``. Those are
left alone and the report says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.graph import (
    drop_unused_attributes, erase_dead, fold_input_affine, format_shape, get_attr_value, is_get_attr, is_number,
    is_shared_tensor, module_path, nodes_by_storage, op_name, replace_by_example, tensor_value, users,
)  # fmt: skip
from rewrite.memory import run_recording_saved
from rewrite.module import clone_graph_module
from rewrite.pass_infra import Pass, PassContext, PassResult, option
from rewrite.pattern import Match, Rule, Rules, any_of, maybe_cast, number, op, var
from rewrite.state import buffers_kept, random_state_kept
from rewrite.verify import Numerics, compare

aten, regelu2, resilu2 = torch.ops.aten, torch.ops.rewrite.regelu2.default, torch.ops.rewrite.resilu2.default
x = var("x")


def _mul(a, b, **kwargs):
    return op(aten.mul.Tensor, a, b, commutative=True, **kwargs)


def _one_plus(a, **kwargs):
    return op(aten.add.Tensor, a, number(1.0), commutative=True, alpha=1, **kwargs)


# -- activations ---------------------------------------------------------------------------


def _step_activation(new_op, approximate: str | None = None):
    """The rule function that puts ``new_op`` (exact forward, 2-bit backward) in place of an
    activation of ``x``; its ``step(match)`` gives x, the replacement and the exact activation
    (functions of x)."""

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
    if node.target not in _IN_PLACE:
        return None
    # The rewrite computes out of place: only right when nothing else can see the mutation.
    if x.op in ("placeholder", "get_attr"):
        return "in-place activation of a model input or parameter: the mutation is visible to the caller"
    aliases = [n for n in next(g for g in nodes_by_storage(node.graph).values() if x in g) if n not in (node, x)]
    if aliases:
        return f"in-place activation of a tensor that shares memory with {aliases[0].name} (a view of it or its base)"
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u for u in users(x) if u is not node and order[u] > order[node]]
    return f"in-place activation whose input is read again afterwards (by {later[0].name})" if later else None


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
    kept = [n.name for n in m.escaping() if not (n.target in _CASTS and n.args[0] is m["x"])]
    return _share_memory(m, "rms", [int(x_val.shape[-1])], float(m["eps"]), kept)


NORMS = Rules(
    Rule(op(aten.layer_norm.default, x, var("shape"), weight=var("weight"), bias=var("bias"), eps=var("eps")),
         lambda m: _share_memory(m, "layer", list(m["shape"]), m["eps"])),
    Rule(op(aten.rms_norm.default, x, var("shape"), weight=var("weight"), eps=var("eps")),
         lambda m: _share_memory(m, "rms", list(m["shape"]), m["eps"])),
    Rule(HAND_WRITTEN_RMS_NORM, _hand_written_rms_norm, what="hand-written RMSNorm"),
)  # fmt: skip
_CASTS = (aten.to.dtype, aten._to_copy.default, torch.ops.prims.convert_element_type.default)
_LINEAR = any_of(  # the weight as nn.Linear stores it ([out, in], "w") or as GPT-2's Conv1D does ([in, out], "wt")
    op(aten.linear.default, var("x"), var("w"), bias=var("b")),
    op(aten.addmm.default, var("b"), var("x"), var("wt"), beta=1, alpha=1),
    op((aten.mm.default, aten.matmul.default), var("x"), var("wt", where=is_get_attr)),
)
_ROW_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor)


def _share_memory(m: Match, kind: str, shape: list[int], eps: float | None, kept: list[str] = ()):
    """The memory-sharing norm in place of ``m`` (bound: x, weight, bias), its affine parameters
    folded into the linear layers reading it; or why it must stay."""
    gm, weight, bias = m.root.graph.owning_module, m.get("weight"), m.get("bias")
    linears, problem = _linear_readers(m.root, m["x"])
    problem = problem or _fold_problem(gm, shape, weight, bias, linears)
    if problem:
        return m.skip(problem)
    if weight is not None or bias is not None:
        gamma = get_attr_value(gm, weight).detach().double().reshape(-1) if weight is not None else None
        gamma = gamma + 1 if "one_plus" in m.bindings else gamma
        beta = get_attr_value(gm, bias) if bias is not None else None
        for lin in linears:
            fold_input_affine(gm, lin.root, lin.get("w", lin.get("wt")), lin.get("b"), gamma, beta, out_features_first="w" in lin.bindings)
    names = ", ".join(sorted({module_path(lin.root) or lin.root.name for lin in linears}))
    m.note(
        f"saves its output, shared with {names}" + ("; affine parameters folded into them" if weight is not None or bias is not None else "")
        + (f"; its inner values {', '.join(kept)} are used elsewhere too and stay" if kept else "")
    )  # fmt: skip
    ms_norm = torch.ops.rewrite.ms_layer_norm.default if kind == "layer" else torch.ops.rewrite.ms_rms_norm.default
    return replace_by_example(m, lambda t: ms_norm(t, shape, eps)[0], m["x"])


def _linear_readers(root: fx.Node, x: fx.Node) -> tuple[list[Match], str | None]:
    """The linear layers reading norm ``root`` (directly or through views that keep its rows),
    or why some reader is not one."""
    x_val, out_val = tensor_value(x), tensor_value(root)
    if x_val is None or not x_val.is_floating_point():
        return [], "input is not a floating-point tensor"
    if out_val is None or out_val.dtype != x_val.dtype:
        return [], "its output dtype differs from its input dtype"
    if out_val.shape != x_val.shape:
        return [], "its weight broadcasts the output to another shape than the input's"
    linears, pending = [], [root]
    while pending:
        value = pending.pop()
        for user in users(value):
            if user.op == "output":
                return [], "its output is an output of the model, so it cannot drop its affine parameters"
            if user.target in (aten.dropout.default, aten.feature_dropout.default):
                return [], f"a dropout ({user.name}) follows it: the next layer saves the dropout's output, so there is nothing to share"
            if user.target in _ROW_VIEWS and user.args[0] is value and _keeps_rows(user, out_val.shape[-1]):
                pending.append(user)  # GPT-2's Conv1D: a view to 2-D, then addmm
                continue
            linear = _LINEAR.match(user)
            if linear is None or linear["x"] is not value:
                return [], f"its output is also used by {user.name} ({op_name(user)}), not only by linear layers: the memory could not be shared"
            linears.append(linear)
    return linears, None if linears else "its output is unused"


def _keeps_rows(view: fx.Node, features) -> bool:
    """Whether a view of the norm's (contiguous) output keeps each row of features whole."""
    val = tensor_value(view)
    if val is None or val.dim() == 0 or val.shape[-1] != features:
        return False
    return view.target is not aten.slice.Tensor or (view.args[1] if len(view.args) > 1 else 0) not in (-1, val.dim() - 1)


def _fold_problem(gm: fx.GraphModule, shape: list[int], weight: fx.Node | None, bias: fx.Node | None, linears: list[Match]) -> str | None:
    if weight is None and bias is None:
        return None
    if len(shape) != 1:
        return f"it normalizes over {len(shape)} dimensions: its affine parameters cannot fold into a linear layer"
    for param in (weight, bias):
        if param is None:
            continue
        if not is_get_attr(param):
            return "its affine parameters are computed in the graph, not stored parameters"
        if is_shared_tensor(gm, param):
            return f"its parameter {param.target} is shared with other layers"
        size = tuple(get_attr_value(gm, param).shape)
        if size[-1:] not in ((shape[0],), (1,)) or any(n != 1 for n in size[:-1]):
            return f"its parameter {param.target} has shape {list(size)}, not one value per feature"
    gamma_trainable = weight is not None and get_attr_value(gm, weight).requires_grad
    beta_trainable = bias is not None and get_attr_value(gm, bias).requires_grad
    for linear in linears:
        name, lin_weight, lin_bias = linear.root.name, linear.get("w", linear.get("wt")), linear.get("b")
        if any(p is not None and (not is_get_attr(p) or is_shared_tensor(gm, p)) for p in (lin_weight, lin_bias)):
            return f"linear {name}'s parameters are shared (tied) or computed, so folding would change their other users"
        # Folded parameters train like the linear's: a trainable gamma/beta must not land in a frozen one.
        if (gamma_trainable or beta_trainable) and not get_attr_value(gm, lin_weight).requires_grad:
            return f"its affine parameters are trainable but linear {name}'s weight is frozen: folding would freeze them"
        if beta_trainable and lin_bias is not None and not get_attr_value(gm, lin_bias).requires_grad:
            return f"its bias is trainable but linear {name}'s bias is frozen: folding would freeze it"
        if bias is not None and lin_bias is None and linear.root.target is not aten.linear.default:
            return f"linear {name} ({op_name(linear.root)}) has no bias to take the norm's beta"
    return None


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
        0.9,
        "keep exact backward for the activations whose gradient error per byte saved is largest until the whole-model "
        "gradient cosine on the example inputs is at least this (the error compounds with depth); 0 turns the guard off",
        ge=0,
        le=1,
    )

    @property
    def exact_backward(self) -> bool:
        return not (self.gelu or self.silu)

    def check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not (self.gelu or self.silu or self.norms):
            raise self.fail("gelu, silu and norms are all off, so there is nothing to do; turn one on")

    def postcondition(self, gm: fx.GraphModule, ctx: PassContext, result: PassResult) -> None:
        remaining = {n.name for n in gm.graph.nodes} & {c.node for c in result.changes}
        if remaining:
            raise self.fail(f"reported {', '.join(sorted(remaining))} as replaced, but they are still in the graph")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        guard = _Guard(self, clone_graph_module(gm), ctx) if self.min_cosine > 0 and (self.gelu or self.silu) else None
        kept = guard.kept_exact() if guard else {}
        params = dict(gm.named_parameters(remove_duplicate=False))
        result = self._rewrite(gm, kept)
        result.figures = {
            "activations replaced": sum(c.after in _STEP_OPS for c in result.changes),
            "norms replaced": sum(c.after.startswith("rewrite.ms_") for c in result.changes),
            "linear layers folded into": sum(_folded_into(gm, lin, params) for lin in map(_LINEAR.match, gm.graph.nodes) if lin),
        }
        if guard and guard.before is not None:
            result.figures.update(
                {"gradient_cosine_before_guard": guard.before, "gradient_cosine": guard.after, "activations kept exact": len(kept)}
            )
        return result

    def _rewrite(self, gm: fx.GraphModule, kept_exact: Mapping[str, str] = {}) -> PassResult:
        """The rules on ``gm``, in place; the activations named in ``kept_exact`` are left alone
        with the reason given there."""
        read = [n for n in gm.graph.find_nodes(op="get_attr") if users(n)]
        tables = ((self.gelu, _keeping_exact(GELU, kept_exact)), (self.silu, _keeping_exact(SILU, kept_exact)), (self.norms, NORMS))
        rules = sum((table for on, table in tables if on), Rules())
        result = rules.apply(gm)
        # A replaced in-place activation has effects, so the driver left it; nothing reads it.
        changed = {c.node for c in result.changes}
        erase_dead(gm.graph, [n for n in gm.graph.nodes if n.target in _IN_PLACE and n.name in changed])
        drop_unused_attributes(gm, read)  # the folded norms' gamma and beta
        gm.recompile()
        return result


def _keeping_exact(rules: Rules, kept_exact: Mapping[str, str]) -> Rules:
    """``rules``, except that the activations named in ``kept_exact`` are left alone, with the reason given there."""

    def leaving(rewrite):
        return lambda m: m.skip(kept_exact[m.root.name]) if m.root.name in kept_exact else rewrite(m)

    return Rules(*(dataclasses.replace(rule, rewrite=leaving(rule.rewrite)) for rule in rules.rules)) if kept_exact else rules


class _Guard:
    """Which replaced activations keep their exact backward so that the whole-model gradient
    cosine (against ``original``, on the example inputs, as the final check measures it)
    reaches ``min_cosine``. Runs: one comparison of the full rewrite; where it falls short,
    one forward + backward of ``original`` that ranks the activations by the error their step
    derivative puts into the gradient at their input (under the exact gradient from above)
    per byte they save, then a bisection over how many of the worst to keep exact, each
    candidate compared (about log2(n) + 1 comparisons). A comparison runs forward + backward
    of both graphs."""

    def __init__(self, p: ApproxBP, original: fx.GraphModule, ctx: PassContext):
        self.p, self.original, self.ctx = p, original, ctx
        self.before: float | None = None  # gradient cosine with every activation replaced
        self.after: float | None = None  # with the guard's choice

    def _compare(self, kept_exact: Mapping[str, str] = {}) -> tuple[Numerics, PassResult]:
        trial = clone_graph_module(self.original)
        result = self.p._rewrite(trial, kept_exact)
        return compare(self.original, trial, self.ctx.example_args, self.ctx.example_kwargs), result

    def kept_exact(self) -> dict[str, str]:
        """Node name -> why it keeps its exact backward."""
        numerics, result = self._compare()
        replaced = [c.node for c in result.changes if c.after in _STEP_OPS]
        self.before = self.after = numerics.grad_cosine
        if not replaced or self.before is None or self.before >= self.p.min_cosine:
            return {}
        ranked = self._rank(replaced)
        cosines = {0: self.before}  # number of the worst kept exact -> gradient cosine

        def cosine(k: int) -> float:
            if k not in cosines:
                cosines[k] = self._compare(dict.fromkeys(name for name, *_ in ranked[:k]))[0].grad_cosine or 0.0
            return cosines[k]

        low, high = 0, len(ranked)  # below min_cosine with `low` kept exact; every one exact meets it
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if cosine(middle) >= self.p.min_cosine else (middle, high)
        self.after = cosine(high)
        fewer = f"with the {low} worst kept exact" if low else "with every activation approximate"
        return {
            name: f"kept exact backward: {fewer} the gradient cosine is {cosines[low]:.3g} < min_cosine {self.p.min_cosine:g}, "
            f"with these {high} it is {self.after:.3g}; its step derivative has the {_ordinal(rank)} largest error per byte "
            f"saved of the {len(ranked)} replaced (relative error {error:.3g} in the gradient at its input, {saved} bytes saved)"
            for rank, (name, error, saved, _) in enumerate(ranked[:high], 1)
        }

    def _rank(self, replaced: list[str]) -> list[tuple[str, float, int, float]]:
        """(name, relative error of the gradient at its input, bytes saved, error per byte saved),
        largest error per byte first: one forward + backward of the original graph under the
        final check's random projection of the outputs; at each activation, the gradient from
        above goes through the exact and the step derivative."""
        nodes = {n.name: n for n in self.original.graph.nodes}
        steps = {name: _step_of(nodes[name]) for name in replaced}
        keep = {*replaced, *(x.name for x, *_ in steps.values())}
        inputs = (self.ctx.example_args, self.ctx.example_kwargs)
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone().requires_grad_(t.is_floating_point()), inputs)
        with buffers_kept(self.original), random_state_kept():
            torch.manual_seed(0)  # as compare runs them: the same dropout masks
            out, _, values = run_recording_saved(self.original, args, kwargs, keep)
        generator = torch.Generator().manual_seed(1)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        loss = sum((t.double() * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)).sum() for t in outs)
        reached = [name for name in replaced if values[name].requires_grad]
        from_above = dict.fromkeys(replaced)
        if outs and reached:
            from_above.update(zip(reached, torch.autograd.grad(loss, [values[n] for n in reached], allow_unused=True)))
        ranked = []
        for name in replaced:
            x_node, step, exact_activation = steps[name]
            # (An in-place one's input is seen after the mutation: a rough rank; the bisection measures.)
            x, g = values[x_node.name].detach().requires_grad_(), from_above[name]
            saved = x.numel() * x.element_size() - math.ceil(x.numel() / 4)  # its input, kept as 2-bit codes
            error = 0.0
            if g is not None:
                exact = torch.autograd.grad(exact_activation(x), x, g)[0].double()
                error = ((exact - torch.autograd.grad(step(x), x, g)[0].double()).norm() / exact.norm().clamp_min(1e-300)).item()
            ranked.append((name, error, saved, math.inf if saved <= 0 else error / saved))
        return sorted(ranked, key=lambda r: -r[3])


def _step_of(node: fx.Node):
    """(x, replacement, exact activation) of the activation ``node`` the rules replace."""
    for rule in (GELU + SILU).rules:
        m = rule.pattern.match(node)
        if m is not None:
            return rule.rewrite.step(m)
    raise ValueError(f"{node.name} is no activation the rules replace")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _folded_into(gm: fx.GraphModule, linear: Match, params_before: dict) -> bool:
    """Whether the fold replaced (or added) the linear layer's weight or bias."""
    return any(is_get_attr(p) and params_before.get(p.target) is not get_attr_value(gm, p) for p in (linear.get("w", linear.get("wt")), linear.get("b")))
