"""Folding a per-feature affine map into the linear layers that read it: when every reader of
``y = x * scale + shift`` is a linear layer, each can compute on ``x`` what it computed on
``y`` (W' = W diag(scale), b' = b + W shift), and the map leaves the graph.

    linears, problem = linear_readers(norm)         # Matches of LINEAR, or why not all are
    problem = problem or fold_problem(gm, features, gamma_node, beta_node, linears)
    for linear in linears:
        fold_input_affine(gm, linear, gamma, beta)

A linear layer is ``aten.linear`` (weight [out, in], bound "w"), or GPT-2's ``Conv1D``: a view
to 2-D, then ``addmm(b, x, W)`` with W [in, out] (bound "wt"), or a bare ``mm``/``matmul``
with a stored weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from rewrite.graph import add_parameter, get_attr_value, is_get_attr, is_shared_tensor, op_name, set_attr_value, tensor_value, users
from rewrite.pattern import Match, any_of, op, var

aten = torch.ops.aten

LINEAR = any_of(
    op(aten.linear.default, var("x"), var("w"), bias=var("b")),
    op(aten.addmm.default, var("b"), var("x"), var("wt"), beta=1, alpha=1),
    op((aten.mm.default, aten.matmul.default), var("x"), var("wt", where=is_get_attr)),
)
_ROW_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor)
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default)


def linear_weight(linear: Match) -> fx.Node:
    """The weight node of a match of ``LINEAR``."""
    return linear.get("w", linear.get("wt"))


def linear_readers(value: fx.Node) -> tuple[list[Match], str | None]:
    """The linear layers reading ``value`` (directly, or through views that keep each row of
    its last dimension whole), or why some reader is not one."""
    features = tensor_value(value).shape[-1]
    linears, pending = [], [value]
    while pending:
        seen = pending.pop()
        for user in users(seen):
            if user.op == "output":
                return [], "its output is an output of the model, so it cannot drop its affine parameters"
            if user.target in _DROPOUTS:
                return [], f"a dropout ({user.name}) follows it, not a linear layer: the next layer saves the dropout's output"
            if user.target in _ROW_VIEWS and user.args[0] is seen and _keeps_rows(user, features):
                pending.append(user)
                continue
            linear = LINEAR.match(user)
            if linear is None or linear["x"] is not seen:
                return [], f"its output is also used by {user.name} ({op_name(user)}), not only by linear layers"
            linears.append(linear)
    return linears, None if linears else "its output is unused"


def _keeps_rows(view: fx.Node, features: int) -> bool:
    """Whether a view of a contiguous value keeps each row of ``features`` whole."""
    val = tensor_value(view)
    if val is None or val.dim() == 0 or val.shape[-1] != features:
        return False
    return view.target is not aten.slice.Tensor or (view.args[1] if len(view.args) > 1 else 0) not in (-1, val.dim() - 1)


def fold_problem(gm: fx.GraphModule, shape: Sequence[int], scale: fx.Node | None, shift: fx.Node | None, linears: list[Match]) -> str | None:
    """Why the affine map with parameters ``scale``/``shift`` (get_attr nodes, or None) over
    the trailing dimensions ``shape`` cannot be folded into ``linears``, or None when it can."""
    if (scale is not None or shift is not None) and len(shape) != 1:
        return f"its affine parameters span {len(shape)} dimensions: they cannot fold into a linear layer"
    features = shape[-1]
    for param in (scale, shift):
        if param is None:
            continue
        if not is_get_attr(param):
            return "its affine parameters are computed in the graph, not stored parameters"
        if is_shared_tensor(gm, param):
            return f"its parameter {param.target} is shared with other layers"
        size = tuple(get_attr_value(gm, param).shape)
        if size[-1:] not in ((features,), (1,)) or any(n != 1 for n in size[:-1]):
            return f"its parameter {param.target} has shape {list(size)}, not one value per feature"
    scale_trainable = scale is not None and get_attr_value(gm, scale).requires_grad
    shift_trainable = shift is not None and get_attr_value(gm, shift).requires_grad
    for linear in linears:
        name, weight, bias = linear.root.name, linear_weight(linear), linear.get("b")
        if any(p is not None and (not is_get_attr(p) or is_shared_tensor(gm, p)) for p in (weight, bias)):
            return f"linear {name}'s parameters are shared (tied) or computed, so folding would change their other users"
        # Folded parameters train like the linear's: a trainable scale/shift must not land in a frozen one.
        if (scale_trainable or shift_trainable) and not get_attr_value(gm, weight).requires_grad:
            return f"its affine parameters are trainable but linear {name}'s weight is frozen: folding would freeze them"
        if shift_trainable and bias is not None and not get_attr_value(gm, bias).requires_grad:
            return f"its bias is trainable but linear {name}'s bias is frozen: folding would freeze it"
        if shift is not None and bias is None and linear.root.target is not aten.linear.default:
            return f"linear {name} ({op_name(linear.root)}) has no bias to take the shift"
    return None


def fold_input_affine(gm: fx.GraphModule, linear: Match, scale: torch.Tensor | None, shift: torch.Tensor | None) -> bool:
    """Make ``linear`` (a match of ``LINEAR``) compute on ``x`` what it computed on ``x *
    scale + shift``: W' = W diag(scale), b' = b + W shift, computed in float64 and stored in
    the parameters' dtype as new parameters, trainable as the old ones were. ``scale``/``shift``
    hold one value per input feature (or one for all). A linear without bias gets one named
    after its weight, trainable as ``shift`` is (``aten.linear`` only: the others need a bias
    already). Returns whether anything changed."""
    weight, bias, out_first = linear_weight(linear), linear.get("b"), "w" in linear.bindings
    old = get_attr_value(gm, weight)
    w64 = old.detach().double()
    if scale is not None:
        scale = scale.detach().double().reshape(-1)
        scaled = w64 * (scale[None, :] if out_first else scale[:, None])
        set_attr_value(gm, weight, torch.nn.Parameter(scaled.to(old.dtype), requires_grad=old.requires_grad))
    if shift is None:
        return scale is not None
    shift64 = shift.detach().double().reshape(-1).expand(w64.shape[1 if out_first else 0])
    offset = w64 @ shift64 if out_first else shift64 @ w64
    if bias is not None:
        old_bias = get_attr_value(gm, bias)
        new_bias = (old_bias.detach().double() + offset).to(old_bias.dtype)
        set_attr_value(gm, bias, torch.nn.Parameter(new_bias, requires_grad=old_bias.requires_grad))
        return True
    node = linear.root
    if node.target is not aten.linear.default:
        raise ValueError(f"{node.name} ({op_name(node)}) has no bias to add the shift to")
    prefix = weight.target.rsplit(".", 1)[0] + "." if "." in weight.target else ""
    new_bias = torch.nn.Parameter(offset.to(old.dtype), requires_grad=shift.requires_grad)
    node.args = (node.args[0], weight, add_parameter(gm, prefix + "bias", new_bias, like=node))
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    return True
