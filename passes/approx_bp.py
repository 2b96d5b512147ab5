"""approx_bp: approximate-backward activations and memory-sharing norms (Approx-BP).

- GELU and SiLU (module or functional, exact or tanh GELU) become ``rewrite.regelu2`` /
  ``rewrite.resilu2``: the forward is exactly the activation; the backward uses a step
  derivative from 2-bit codes, so the activation keeps 2 bits per element instead of a full
  copy of its input.
- LayerNorm and RMSNorm (``nn.LayerNorm``, ``F.layer_norm``, ``nn.RMSNorm``, ``F.rms_norm``
  and the hand-written LLaMA/T5 RMSNorm) whose every user is a linear layer become
  ``rewrite.ms_layer_norm`` / ``ms_rms_norm``, which save their output (the tensor the linear
  layers save anyway) instead of their input. Their affine parameters are folded into those
  linear layers in float64 (W' = W diag(gamma), b' = b + W beta). A norm whose output is
  used by anything else (a dropout, an activation, the model's output) is left alone and
  the report says why.

Exactness: outputs equal the original's up to float rounding; gradients are approximate
when an activation was replaced (the report gives the measured error), exact otherwise.
Folding changes the parameters: the norm's gamma/beta disappear and the linear layers'
weights (and biases) are replaced by folded copies.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from rewrite.graph import (
    ASSERT_METADATA,
    attr_owner,
    call_function,
    erase_dead,
    fake_mode_of,
    format_shape,
    get_attr_value,
    getitem,
    has_attr,
    is_shared_tensor,
    module_path,
    op_name,
    tensor_value,
)
from rewrite.pass_infra import Change, Pass, PassContext, PassResult, Skip, option
from rewrite.pattern import any_of, op, var

aten = torch.ops.aten
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_CASTS = (aten.to.dtype, aten._to_copy.default)


def _cast(inner):
    """``inner``, possibly behind a dtype cast."""
    return any_of(op(aten.to.dtype, inner, var()), op(aten._to_copy.default, inner), inner)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_get_attr(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _hand_written_rms_norm():
    """x * rsqrt(mean(x^2, -1, keepdim) + eps) [* weight], casts allowed around x and the result."""
    x = var("x")
    square = any_of(
        op(aten.pow.Tensor_Scalar, _cast(x), 2, name="square"), op(aten.mul.Tensor, _cast(x), _cast(x), name="square")
    )
    variance = op(aten.mean.dim, square, var("dims"), True)
    shifted = op(aten.add.Tensor, variance, var("eps", where=_is_number), commutative=True)
    normed = any_of(
        op(aten.mul.Tensor, _cast(x), op(aten.rsqrt.default, shifted), commutative=True),
        op(aten.div.Tensor, _cast(x), op(aten.sqrt.default, shifted)),
    )
    scaled = op(aten.mul.Tensor, var("weight", where=_is_get_attr), _cast(normed), commutative=True)
    return any_of(scaled, _cast(normed))


_RMS_PATTERN = _hand_written_rms_norm()


@dataclass
class _Norm:
    kind: str  # "layer" or "rms"
    root: fx.Node  # the node whose value is the norm's output
    x: fx.Node
    normalized_shape: list[int]
    eps: float | None
    weight: fx.Node | None
    bias: fx.Node | None
    nodes: list[fx.Node]  # every node of the norm (one for aten calls, several when hand-written)
    problem: str | None = None  # found while matching: why it must be left alone
    kept: list[str] = field(default_factory=list)  # inner values also used elsewhere (they stay)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _match_norm(node: fx.Node) -> _Norm | None:
    if node.op != "call_function":
        return None
    if node.target is aten.layer_norm.default:
        return _Norm(
            "layer", node, node.args[0], list(node.args[1]), _arg(node, 4, "eps", 1e-5),
            _arg(node, 2, "weight"), _arg(node, 3, "bias"), [node],
        )  # fmt: skip
    if node.target is aten.rms_norm.default:
        return _Norm("rms", node, node.args[0], list(node.args[1]), _arg(node, 3, "eps"), _arg(node, 2, "weight"), None, [node])
    m = _RMS_PATTERN.match(node)
    if m is None:
        return None
    x = m["x"]
    x_val, square = tensor_value(x), tensor_value(m["square"])
    if x_val is None or square is None or list(m["dims"]) not in ([-1], [x_val.dim() - 1]):
        return None
    norm = _Norm("rms", node, x, [int(x_val.shape[-1])], float(m["eps"]), m.get("weight"), None, m.nodes)
    # Inner values used outside the norm stay in the graph (a cast of x alone costs nothing).
    norm.kept = [n.name for n in m.escaping() if not (n.target in _CASTS and n.args[0] is x)]
    if torch.promote_types(square.dtype, x_val.dtype) != square.dtype:
        # ms_rms_norm computes in at least the input's precision: the result would differ.
        norm.problem = f"it computes in {square.dtype} on a {x_val.dtype} input; the rewrite would compute in {x_val.dtype}"
    return norm


@dataclass(frozen=True)
class ApproxBP(Pass):
    """Approx-BP: GELU/SiLU with 2-bit approximate backward, LayerNorm/RMSNorm that share memory with the next linear."""

    name: ClassVar[str] = "approx_bp"
    gelu: bool = option(True, "replace GELU (exact and tanh form) by ReGELU2: exact forward, 2-bit step-derivative backward")
    silu: bool = option(True, "replace SiLU by ReSiLU2: exact forward, 2-bit step-derivative backward")
    norms: bool = option(
        True,
        "replace LayerNorm/RMSNorm whose users are all linear layers by memory-sharing versions, "
        "folding gamma/beta into those layers",
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
        result = PassResult()
        activations = self._activations(gm, result)
        norms, folded = self._norms(gm, result) if self.norms else (0, 0)
        result.figures = {
            "activations replaced": activations,
            "norms replaced": norms,
            "linear layers folded into": folded,
        }
        return result

    # -- activations -----------------------------------------------------------------------

    def _activation_op(self, node: fx.Node):
        if node.op != "call_function":
            return None
        if self.gelu and node.target in (aten.gelu.default, aten.gelu_.default):
            return torch.ops.rewrite.regelu2.default
        if self.silu and node.target in (aten.silu.default, aten.silu_.default):
            return torch.ops.rewrite.resilu2.default
        return None

    def _activations(self, gm: fx.GraphModule, result: PassResult) -> int:
        graph = gm.graph
        # Decide on every activation before changing the graph, so that each decision sees
        # the graph as captured.
        order = {n: i for i, n in enumerate(graph.nodes)}
        sharing = _nodes_by_storage(graph)
        plan = []
        for node in graph.nodes:
            new_op = self._activation_op(node)
            if new_op is None:
                continue
            problem = _activation_problem(node, order, sharing)
            if problem:
                result.skipped.append(Skip(node.name, module_path(node), op_name(node), problem))
            else:
                plan.append((node, new_op))
        for node, new_op in plan:
            x = node.args[0]
            approximate = _arg(node, 1, "approximate", "none")
            kwargs = {"approximate": approximate} if new_op is torch.ops.rewrite.regelu2.default else {}
            short = new_op._schema.name.split("::")[1]
            with graph.inserting_before(node):
                fused = call_function(graph, new_op, (x,), kwargs, like=node, name=short)
                out = getitem(graph, fused, 0, name=f"{short}_out")
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            bits = tensor_value(x).element_size() * 8
            result.changes.append(
                Change(
                    node.name, module_path(node), op_name(node), f"rewrite.{short}",
                    f"{format_shape(out)}: backward keeps 2 bits per element instead of {bits}",
                )
            )  # fmt: skip
        return len(plan)

    # -- norms -----------------------------------------------------------------------------

    def _norms(self, gm: fx.GraphModule, result: PassResult) -> tuple[int, int]:
        # Longest match first: scanning backwards, a hand-written RMSNorm is matched at its
        # weight multiplication before its inner nodes could be taken for a norm of their own.
        claimed: set[fx.Node] = set()
        found: list[_Norm] = []
        for node in reversed(gm.graph.nodes):
            if node in claimed:
                continue
            norm = _match_norm(node)
            if norm is not None:
                claimed.update(norm.nodes)
                found.append(norm)
        replaced = folded = 0
        for norm in reversed(found):
            problem = self._norm_problem(gm, norm)
            if problem:
                result.skipped.append(Skip(norm.root.name, module_path(norm.root), _norm_op_name(norm), problem))
                continue
            linears = _users(norm.root)
            self._replace_norm(gm, norm, linears)
            replaced += 1
            folded += len(linears) if (norm.weight is not None or norm.bias is not None) else 0
            names = ", ".join(sorted({module_path(lin) or lin.name for lin in linears}))
            detail = f"saves its output, shared with {names}"
            if norm.weight is not None or norm.bias is not None:
                detail += "; affine parameters folded into them"
            if norm.kept:
                detail += f"; its inner values {', '.join(norm.kept)} are used elsewhere too and stay"
            result.changes.append(
                Change(norm.root.name, module_path(norm.root), _norm_op_name(norm), f"rewrite.ms_{norm.kind}_norm", detail)
            )
        return replaced, folded

    def _norm_problem(self, gm: fx.GraphModule, norm: _Norm) -> str | None:
        if norm.problem:
            return norm.problem
        x_val = tensor_value(norm.x)
        out_val = tensor_value(norm.root)
        if x_val is None or x_val.dtype not in _FLOAT_TYPES:
            return "input is not a floating-point tensor"
        if out_val is None or out_val.dtype != x_val.dtype:
            return "its output dtype differs from its input dtype"
        if out_val.shape != x_val.shape:
            return "its weight broadcasts the output to another shape than the input's"
        users = _users(norm.root)
        for user in users:
            if user.op == "output":
                return "its output is an output of the model, so it cannot drop its affine parameters"
            if user.target in (aten.dropout.default, aten.feature_dropout.default):
                return f"a dropout ({user.name}) follows it: the next layer saves the dropout's output, so there is nothing to share"
            if user.target is not aten.linear.default or user.args[0] is not norm.root:
                return f"its output is also used by {user.name} ({op_name(user)}), not only by linear layers: the memory could not be shared"
        if not users:
            return "its output is unused"
        if norm.weight is None and norm.bias is None:
            return None
        if len(norm.normalized_shape) != 1:
            return f"it normalizes over {len(norm.normalized_shape)} dimensions: its affine parameters cannot fold into a linear layer"
        features = norm.normalized_shape[0]
        for param in (norm.weight, norm.bias):
            if param is None:
                continue
            if not _is_get_attr(param):
                return "its affine parameters are computed in the graph, not stored parameters"
            if is_shared_tensor(gm, param):
                return f"its parameter {param.target} is shared with other layers"
            shape = tuple(get_attr_value(gm, param).shape)
            if shape[-1:] not in ((features,), (1,)) or any(size != 1 for size in shape[:-1]):
                return f"its parameter {param.target} has shape {list(shape)}, not one value per feature"
        gamma_trainable = norm.weight is not None and get_attr_value(gm, norm.weight).requires_grad
        beta_trainable = norm.bias is not None and get_attr_value(gm, norm.bias).requires_grad
        for lin in users:
            weight = lin.args[1]
            bias = _arg(lin, 2, "bias")
            for param in (weight, bias):
                if param is None:
                    continue
                if not _is_get_attr(param) or is_shared_tensor(gm, param):
                    return f"linear {lin.name}'s parameters are shared (tied) or computed, so folding would change their other users"
            # Folded parameters train like the linear's: a trainable gamma/beta must not land in a frozen one.
            if (gamma_trainable or beta_trainable) and not get_attr_value(gm, weight).requires_grad:
                return f"its affine parameters are trainable but linear {lin.name}'s weight is frozen: folding would freeze them"
            if beta_trainable and bias is not None and not get_attr_value(gm, bias).requires_grad:
                return f"its bias is trainable but linear {lin.name}'s bias is frozen: folding would freeze it"
        return None

    def _replace_norm(self, gm: fx.GraphModule, norm: _Norm, linears: list[fx.Node]) -> None:
        graph = gm.graph
        if norm.weight is not None or norm.bias is not None:
            gamma = get_attr_value(gm, norm.weight).detach().double().reshape(-1) if norm.weight is not None else None
            beta = get_attr_value(gm, norm.bias) if norm.bias is not None else None
            for lin in linears:
                _fold_into_linear(gm, lin, gamma, beta)
        target = torch.ops.rewrite.ms_layer_norm.default if norm.kind == "layer" else torch.ops.rewrite.ms_rms_norm.default
        with graph.inserting_before(norm.root):
            fused = call_function(graph, target, (norm.x, norm.normalized_shape, norm.eps), like=norm.root, name=f"ms_{norm.kind}_norm")
            out = getitem(graph, fused, 0, name=f"ms_{norm.kind}_norm_out")
        norm.root.replace_all_uses_with(out)
        erase_dead(graph, norm.nodes)
        for param in (norm.weight, norm.bias):
            if param is not None and not param.users:
                _drop_attribute(gm, param)


def _norm_op_name(norm: _Norm) -> str:
    if len(norm.nodes) == 1:
        return op_name(norm.root)
    return "hand-written RMSNorm"


def _nodes_by_storage(graph: fx.Graph) -> dict:
    """Nodes grouped by the (fake) storage their tensor lives in: views share one."""
    groups: dict = defaultdict(list)
    for node in graph.nodes:
        val = tensor_value(node)
        if val is not None:
            groups[StorageWeakRef(val.untyped_storage())].append(node)
    return groups


def _activation_problem(node: fx.Node, order: dict, sharing: dict) -> str | None:
    x = node.args[0]
    val = tensor_value(x) if isinstance(x, fx.Node) else None
    if val is None or val.dtype not in _FLOAT_TYPES:
        return f"input is not a floating-point tensor ({format_shape(x) if isinstance(x, fx.Node) else type(x).__name__})"
    if node.target not in (aten.gelu_.default, aten.silu_.default):
        return None
    # The rewrite computes out of place: only right when nothing else can see the mutation.
    if x.op in ("placeholder", "get_attr"):
        return "in-place activation of a model input or parameter: the mutation is visible to the caller"
    aliases = [n for n in sharing[StorageWeakRef(val.untyped_storage())] if n is not node and n is not x]
    if aliases:
        return f"in-place activation of a tensor that shares memory with {aliases[0].name} (a view of it or its base)"
    later = [u for u in x.users if u is not node and order[u] > order[node] and u.target is not ASSERT_METADATA]
    if later:
        return f"in-place activation whose input is read again afterwards (by {later[0].name})"
    return None


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is not ASSERT_METADATA]


def _fold_into_linear(gm: fx.GraphModule, lin: fx.Node, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> None:
    """Fold y*gamma + beta into linear ``lin`` (computed in float64, stored in its dtype):
    W' = W diag(gamma), b' = b + W beta. ``beta`` is the norm's bias parameter itself."""
    weight_node = lin.args[1]
    bias_node = _arg(lin, 2, "bias")
    weight = get_attr_value(gm, weight_node)
    w64 = weight.detach().double()
    if gamma is not None:
        owner, leaf = attr_owner(gm, weight_node.target)
        setattr(owner, leaf, torch.nn.Parameter((w64 * gamma[None, :]).to(weight.dtype), requires_grad=weight.requires_grad))
    if beta is None:
        return
    shift = w64 @ beta.detach().double().reshape(-1).expand(w64.shape[1])
    if bias_node is not None:
        bias = get_attr_value(gm, bias_node)
        b_owner, b_leaf = attr_owner(gm, bias_node.target)
        new_bias = bias.detach().double() + shift
        setattr(b_owner, b_leaf, torch.nn.Parameter(new_bias.to(bias.dtype), requires_grad=bias.requires_grad))
        return
    # The linear had no bias: give it one, named after its weight, trainable as beta was.
    prefix = weight_node.target.rsplit(".", 1)[0] + "." if "." in weight_node.target else ""
    name = prefix + "bias"
    suffix = 0
    while has_attr(gm, name):
        suffix += 1
        name = f"{prefix}bias_folded{suffix}"
    b_owner, b_leaf = attr_owner(gm, name)
    new_bias = torch.nn.Parameter(shift.to(weight.dtype), requires_grad=beta.requires_grad)
    b_owner.register_parameter(b_leaf, new_bias)
    with gm.graph.inserting_before(lin):
        bias_node = gm.graph.get_attr(name)
    fake_mode = fake_mode_of(gm)
    bias_node.meta["val"] = fake_mode.from_tensor(new_bias) if fake_mode is not None else new_bias
    args = list(lin.args) + [None] * (3 - len(lin.args))
    args[2] = bias_node
    lin.args = tuple(args)
    lin.kwargs = {k: v for k, v in lin.kwargs.items() if k != "bias"}


def _drop_attribute(gm: fx.GraphModule, node: fx.Node) -> None:
    target = node.target
    gm.graph.erase_node(node)
    if not any(n.target == target for n in gm.graph.find_nodes(op="get_attr")):
        owner, leaf = attr_owner(gm, target)
        delattr(owner, leaf)
