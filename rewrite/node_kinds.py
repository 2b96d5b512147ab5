"""What kind of op a node runs, where memory and recomputation depend on it: aliases own no
memory, random ops must not run twice, mutating ops keep a graph from being reordered, and a
multi-output op's outputs are storages of their own. Used by the liveness model
(``rewrite.liveness``), the cost models (``rewrite.costs``) and the passes that recompute."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops whose output shares its input's storage although their schema does not say so.
_STORAGE_SHARING = {aten._unsafe_view.default, aten.alias.default, aten.detach.default}
_BATCH_NORM = aten._native_batch_norm_legit_functional.default


def is_alias(node: fx.Node) -> bool:
    """Whether the node's output is a view of (part of) one of its inputs."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or node.target in _STORAGE_SHARING:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns))


def is_random(node: fx.Node) -> bool:
    """Whether running the node twice may give different values: a random op, unless its
    dropout probability is 0 (attention without dropout is tagged random too) or it is off."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        values.update({a.name: v for a, v in zip(schema.arguments, node.args)})
        values.update(node.kwargs)
        if "dropout_p" in values:
            return values["dropout_p"] not in (0, 0.0)
        if node.target in (aten.native_dropout.default, aten.dropout.default) and (
            values.get("p") in (0, 0.0) or values.get("train") is False
        ):
            return False
    return True


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_split(node) -> bool:
    """A multi-output op whose outputs are only taken apart with getitem."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and isinstance(node.meta.get("val"), (tuple, list))
        and not is_alias(node)
        and bool(node.users)
        and all(u.target is operator.getitem for u in node.users)
    )


def is_training_batch_norm(node: fx.Node) -> bool:
    """A functional batch norm in training mode: it updates the running statistics it reads."""
    return node.target is _BATCH_NORM and bool(node.args[5])
