"""Patterns are data: a small tree of ``Op`` / ``Var`` / ``AnyOf`` matched against fx nodes.

    x = var("x")
    rms = op(aten.mul.Tensor,
             x, op(aten.rsqrt.default, op(aten.add.Tensor, op(aten.mean.dim, op(aten.pow.Tensor_Scalar, x, 2), [-1], True), var("eps"))),
             commutative=True)
    m = rms.match(node)     # Match(root=node, bindings={"x": <node>, "eps": 1e-6}, nodes=[...]) or None

A name bound twice must bind the same value both times, so ``x`` above is one tensor.
``Op`` checks the first ``len(args)`` positional arguments of the node; the rest (and the
keyword arguments) are for the rule that uses the match. A rule is a plain function from a
match to a replacement or ``None``; ``Rule`` pairs the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from rewrite.graph import ASSERT_METADATA



class Pattern(ABC):
    @abstractmethod
    def _match(self, value: Any, bindings: dict, nodes: tuple) -> Iterator[tuple[dict, tuple]]:
        """Every (bindings, matched op nodes) under which ``value`` matches, extending ``bindings``."""

    def match(self, node: fx.Node) -> Match | None:
        """The first way this pattern matches ``node``, or None."""
        for bindings, nodes in self._match(node, {}, ()):
            return Match(root=node, bindings=bindings, nodes=list(nodes))
        return None


@dataclass(frozen=True)
class Var(Pattern):
    """Matches any node or literal; binds it to ``name`` when given; ``where`` filters."""

    name: str | None = None
    where: Callable[[Any], bool] | None = None

    def _match(self, value, bindings, nodes):
        if self.where is not None and not self.where(value):
            return
        if self.name is None:
            yield bindings, nodes
        elif self.name in bindings:
            if _same(bindings[self.name], value):
                yield bindings, nodes
        else:
            yield {**bindings, self.name: value}, nodes


@dataclass(frozen=True)
class Op(Pattern):
    """Matches a call_function node whose target is one of ``targets`` and whose leading
    positional arguments match ``args`` (patterns, or literals compared with ==)."""

    targets: tuple
    args: tuple = ()
    name: str | None = None
    commutative: bool = False
    where: Callable[[fx.Node], bool] | None = None

    def _match(self, value, bindings, nodes):
        if not isinstance(value, fx.Node) or value.op != "call_function" or value.target not in self.targets:
            return
        if len(value.args) < len(self.args):
            return
        if self.where is not None and not self.where(value):
            return
        if self.name is not None:
            if self.name in bindings and bindings[self.name] is not value:
                return
            bindings = {**bindings, self.name: value}
        orders = [tuple(range(len(self.args)))]
        if self.commutative and len(self.args) >= 2:
            orders.append((1, 0, *range(2, len(self.args))))
        for order in orders:
            node_args = [value.args[i] for i in order]
            yield from _match_args(self.args, node_args, bindings, (*nodes, value))


@dataclass(frozen=True)
class AnyOf(Pattern):
    """Matches when any of ``options`` matches, trying them in order."""

    options: tuple

    def _match(self, value, bindings, nodes):
        for option in self.options:
            yield from option._match(value, bindings, nodes)


def _match_args(patterns, values, bindings, nodes):
    if not patterns:
        yield bindings, nodes
        return
    head, *rest = patterns
    if isinstance(head, Pattern):
        for b, n in head._match(values[0], bindings, nodes):
            yield from _match_args(rest, values[1:], b, n)
    elif _same(head, values[0]):
        yield from _match_args(rest, values[1:], bindings, nodes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):  # keepdim=True must not match dim=1
        return type(a) is type(b) and a == b
    return a == b


def op(targets, *args, name: str | None = None, commutative: bool = False, where=None) -> Op:
    """``Op`` for one target or a tuple of targets."""
    targets = tuple(targets) if isinstance(targets, (tuple, list, set, frozenset)) else (targets,)
    return Op(targets, tuple(args), name=name, commutative=commutative, where=where)


def var(name: str | None = None, where=None) -> Var:
    return Var(name, where)


def any_of(*options: Pattern) -> AnyOf:
    return AnyOf(tuple(options))


def maybe(targets, inner: Pattern, *extra_args, name: str | None = None) -> AnyOf:
    """``targets(inner, *extra_args)`` or ``inner`` alone: an optional wrapping op such as a cast."""
    return any_of(op(targets, inner, *extra_args, name=name), inner)


@dataclass
class Match:
    root: fx.Node
    bindings: dict[str, Any]
    nodes: list[fx.Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)

    def escaping(self) -> list[fx.Node]:
        """Matched nodes other than the root whose values are used outside the match: a
        rewrite that removes the matched nodes must leave these alone."""
        inside = set(self.nodes)
        return [
            n
            for n in self.nodes
            if n is not self.root
            and any(u not in inside and u.target is not ASSERT_METADATA for u in n.users)
        ]


@dataclass(frozen=True)
class Rule:
    """A pattern and the function that rewrites a match of it. ``rewrite(match)`` returns
    whatever the pass records (a change, or the reason it left the match alone), or None
    when the rule does not apply after all."""

    name: str
    pattern: Pattern
    rewrite: Callable[[Match], Any]

    def apply(self, node: fx.Node) -> Any:
        m = self.pattern.match(node)
        return None if m is None else self.rewrite(m)
