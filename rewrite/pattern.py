"""Patterns are data: a small tree of ``Op`` / ``Var`` / ``AnyOf`` matched against fx nodes;
a pass is a table of rules over them, run by one driver.

    x = var("x")
    swish = op(aten.mul, x, op(aten.sigmoid, x), commutative=True)   # aten.mul: any overload
    rules = Rules(
        Rule(swish, lambda m: replace_by_example(m, torch.ops.aten.silu.default, m["x"]), what="x * sigmoid(x)"),
    )
    result = rules.apply(gm)         # PassResult: every change and every skip, with its reason

    attention = op(aten.scaled_dot_product_attention.default, var("q"), var("k"), var("v"),
                   is_causal=var("causal"), scale=var("scale"), one_user=True)
    maybe_cast(op(aten.softmax, var("s")))       # softmax, or softmax then a dtype-only cast
    op(aten.mul, var("x"), number(0.5))          # a constant, within float rounding of 0.5

Matching: a name bound twice must bind the same value both times, so ``x`` above is one
tensor. ``Op`` matches a call_function node whose target is one of its targets (an
``OpOverloadPacket`` such as ``aten.mul`` stands for all its overloads); each argument pattern
is compared with the node's argument at that place: positional ones by position, keyword ones
by name, found in the node's kwargs, at the schema position among its positional args, or as
the schema's default when the node leaves it out. Arguments the pattern does not name are for
the rule. ``one_user=True`` asks that nothing else reads the node (metadata assertions aside).

Rules: ``Rule(pattern, fn)``; ``fn(match)`` returns the node that replaces the match's root
(usually from ``rewrite.graph.replace_by_example``), ``match.skip(reason)`` to leave it alone
with a reason the report shows, or None to let the next rule try; ``match.note(text)`` adds
a detail the report shows with the change. ``Rules(...)`` tables compose with ``+``;
``Rules.apply`` is the driver (see there).
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from rewrite.graph import describe_value, is_number, module_path, op_name
from rewrite.graph import users as _users
from rewrite.pass_infra import Change, PassResult, Skip

aten, prims = torch.ops.aten, torch.ops.prims


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


_MISSING = object()  # an argument the node's op does not have


@dataclass(frozen=True)
class Op(Pattern):
    """Matches a call_function node whose target is one of ``targets`` (an overload, or a
    packet standing for all its overloads) and whose arguments match ``args`` (positional)
    and ``kwargs`` ((name, pattern) pairs); each is a pattern or a literal compared with ==."""

    targets: tuple
    args: tuple = ()
    name: str | None = None
    commutative: bool = False
    where: Callable[[fx.Node], bool] | None = None
    kwargs: tuple = ()
    one_user: bool = False

    def _match(self, value, bindings, nodes):
        if not isinstance(value, fx.Node) or value.op != "call_function" or not self._calls_target(value):
            return
        if self.one_user and len(_users(value)) != 1:
            return
        if self.where is not None and not self.where(value):
            return
        positional = [_argument(value, i, None) for i in range(len(self.args))]
        keyword = [_argument(value, None, key) for key, _ in self.kwargs]
        if any(a is _MISSING for a in positional + keyword):
            return
        if self.name is not None:
            if self.name in bindings and bindings[self.name] is not value:
                return
            bindings = {**bindings, self.name: value}
        orders = [positional]
        if self.commutative and len(positional) >= 2:
            orders.append([positional[1], positional[0], *positional[2:]])
        patterns = [*self.args, *(p for _, p in self.kwargs)]
        for order in orders:
            yield from _match_args(patterns, order + keyword, bindings, (*nodes, value))

    def _calls_target(self, node: fx.Node) -> bool:
        packet = getattr(node.target, "overloadpacket", None)
        return any(t is node.target or (packet is not None and t is packet) for t in self.targets)


def _argument(node: fx.Node, index: int | None, name: str | None) -> Any:
    """The node's argument at positional ``index`` or called ``name``: as given positionally or
    by keyword, else the schema's default; ``_MISSING`` when the op has no such argument."""
    if index is not None and index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return _MISSING
    if index is not None:  # past the given positional args: only a positional schema argument counts
        arguments = [a for a in schema.arguments if not a.kwarg_only]
        if index >= len(arguments):
            return _MISSING
        argument = arguments[index]
        if argument.name in node.kwargs:
            return node.kwargs[argument.name]
    else:
        position = next((i for i, a in enumerate(schema.arguments) if a.name == name), None)
        if position is None:
            return _MISSING
        argument = schema.arguments[position]
        if not argument.kwarg_only and position < len(node.args):
            return node.args[position]
    return argument.default_value if argument.has_default_value() else _MISSING


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


def op(
    targets,
    *args,
    name: str | None = None,
    commutative: bool = False,
    where=None,
    one_user: bool = False,
    **kwargs,
) -> Op:
    """``Op`` for one target or a tuple of targets; keyword arguments other than the ones
    named here are argument patterns matched by name (``is_causal=var("causal")``)."""
    targets = tuple(targets) if isinstance(targets, (tuple, list, set, frozenset)) else (targets,)
    return Op(
        targets,
        tuple(args),
        name=name,
        commutative=commutative,
        where=where,
        kwargs=tuple(kwargs.items()),
        one_user=one_user,
    )


def var(name: str | None = None, where=None) -> Var:
    return Var(name, where)


def number(value: float, rel_tol: float = 1e-6) -> Var:
    """A number literal within ``rel_tol`` of ``value``: constants written out in a formula
    (``math.sqrt(2 / math.pi)``, or ``0.7978845608`` typed by hand) match either way."""
    return Var(None, lambda v: is_number(v) and math.isclose(v, value, rel_tol=rel_tol))


def any_of(*options: Pattern) -> AnyOf:
    return AnyOf(tuple(options))


def maybe(targets, inner: Pattern, *extra_args, name: str | None = None) -> AnyOf:
    """``targets(inner, *extra_args)`` or ``inner`` alone: an optional wrapping op such as a cast."""
    return any_of(op(targets, inner, *extra_args, name=name), inner)


CASTS = (aten._to_copy.default, aten.to.dtype, prims.convert_element_type.default)


def _changes_only_dtype(cast: fx.Node) -> bool:
    """A cast that keeps device, layout and memory format: the values are the input's in
    another dtype, so a rule may look through it."""
    if _argument(cast, None, "memory_format") not in (None, torch.preserve_format, _MISSING):
        return False
    if cast.target is not aten._to_copy.default:  # the others cannot move or re-lay-out
        return True
    source = cast.args[0].meta.get("val") if isinstance(cast.args[0], fx.Node) else None
    device = _argument(cast, None, "device")
    same_device = device is None or (source is not None and torch.device(device) == source.device)
    return same_device and _argument(cast, None, "layout") in (None, torch.strided)


def maybe_cast(inner: Pattern, *, name: str | None = None) -> AnyOf:
    """``inner``, or ``inner`` under one dtype-only cast (``aten._to_copy``, ``aten.to.dtype``,
    ``prims.convert_element_type``), the cast bound to ``name`` when given. The cast is tried
    first, so ``maybe_cast(var("x"))`` binds x to what was cast."""
    return any_of(op(CASTS, inner, name=name, where=_changes_only_dtype), inner)


@dataclass
class Match:
    root: fx.Node
    bindings: dict[str, Any]
    nodes: list[fx.Node] = field(default_factory=list)
    detail: str = ""  # what the report says about the change, beyond before -> after

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)

    def escaping(self) -> list[fx.Node]:
        """Matched nodes other than the root whose values are used outside the match: a
        rewrite that removes the matched nodes must leave these alone."""
        inside = set(self.nodes)
        return [n for n in self.nodes if n is not self.root and any(u not in inside for u in _users(n))]

    def note(self, detail: str) -> None:
        """Say more about the change this match makes ("saves 2 bits per element"); the
        report shows it with the change."""
        self.detail = detail

    def skip(self, reason: str) -> Skip:
        """What a rule returns to leave this match alone; the report shows ``reason`` with the node."""
        return Skip(self.root.name, module_path(self.root), op_name(self.root), reason)


@dataclass(frozen=True)
class Rule:
    """A pattern and the function that rewrites a match of it: ``rewrite(match)`` returns the
    node that replaces the match's root, ``match.skip(reason)``, or None (the next rule tries).
    ``what`` names what the pattern matches ("x * sigmoid(x)"): the report shows each change as
    ``what -> replacement's op`` (the op a getitem takes its item of), and skips as ``what``;
    without it, as the root's op."""

    pattern: Pattern
    rewrite: Callable[[Match], fx.Node | Skip | None]
    what: str = ""


class Rules:
    """An ordered table of rules; ``a + b`` tries a's rules, then b's."""

    def __init__(self, *rules: Rule):
        self.rules = rules

    def __add__(self, other: Rules) -> Rules:
        return Rules(*self.rules, *other.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def leaving(self, reasons: Mapping[str, str]) -> Rules:
        """These rules, except that a match whose root is named in ``reasons`` is skipped with
        the reason given there (a guard that keeps some nodes as they are)."""
        if not reasons:
            return self

        def leave(rewrite):
            return lambda m: m.skip(reasons[m.root.name]) if m.root.name in reasons else rewrite(m)

        return Rules(*(replace(rule, rewrite=leave(rule.rewrite)) for rule in self.rules))

    def apply(self, gm: fx.GraphModule, *, fixed_point: bool = False, max_walks: int = 20) -> PassResult:
        """Walk the graph in order and rewrite each node with the first rule that returns
        something for it. A replacement node takes over the root's users here, not in
        ``replace_by_example``, so that one place checks its shape and dtype first and records
        the change; the nodes left unused then are removed. A ``Skip`` is recorded. Nodes a
        walk adds are looked at by the next walk: with ``fixed_point`` the walks repeat until
        one changes nothing, at most ``max_walks`` times (RuntimeError beyond: the rules undo
        each other or grow the graph without end). Returns every change and every skip (each
        once); ``gm`` is recompiled."""
        result = PassResult()
        skipped: dict[tuple[str, str], Skip] = {}
        walks = 0
        while True:
            changes = self._walk(gm, skipped)
            result.changes += changes
            walks += 1
            if not (fixed_point and changes):
                break
            if walks == max_walks:
                example = changes[0]
                raise RuntimeError(
                    f"the rules still changed {len(changes)} node(s) (e.g. {example.node}: {example.before} -> "
                    f"{example.after}) after {max_walks} walks over the graph: "
                    "they undo each other or keep growing it"
                )
        result.skipped = list(skipped.values())
        gm.recompile()
        return result

    def _walk(self, gm: fx.GraphModule, skipped: dict) -> list[Change]:
        changes, erased = [], set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            for rule in self.rules:
                m = rule.pattern.match(node)
                outcome = None if m is None else rule.rewrite(m)
                if outcome is None:
                    continue
                if isinstance(outcome, Skip):
                    outcome = replace(outcome, op=rule.what) if rule.what else outcome
                    skipped.setdefault((outcome.node, outcome.reason), outcome)
                else:
                    changes.append(_replace(m, outcome, rule))
                    erased |= _erase_dead(gm.graph, node, replaced=True)
                break
        return changes


def _replace(match: Match, new: Any, rule: Rule) -> Change:
    root = match.root
    what = rule.what or op_name(root)
    if not isinstance(new, fx.Node):
        raise TypeError(
            f"the rule for {what} on {root.name} returned {type(new).__name__}: give a node, match.skip(reason) or None"
        )
    old_value, new_value = describe_value(root.meta.get("val")), describe_value(new.meta.get("val"))
    if old_value != new_value:
        raise ValueError(
            f"the rule for {what} would replace {root.name} ({old_value}) by {new.name} ({new_value or 'no meta[val]'})"
        )
    root.replace_all_uses_with(new)
    source = new.args[0] if new.target is operator.getitem and isinstance(new.args[0], fx.Node) else new
    return Change(root.name, module_path(root), what, op_name(source), match.detail)


def _erase_dead(graph: fx.Graph, root: fx.Node, replaced: bool = False) -> set[fx.Node]:
    """Erase ``root`` if nothing reads it, then the call nodes it fed that nothing reads any
    more, and so on; never a node with effects (in-place ops, random ops), except a ``replaced``
    root: the rule that replaced it answers for its effects (an in-place op computed out of
    place once ``rewrite.graph.out_of_place_problem`` found nothing else sees the mutation).
    torch.export's metadata assertions on an erased node go with it."""
    erased, pending = set(), [root]
    while pending:
        node = pending.pop()
        effects = _has_effects(node) and not (replaced and node is root)
        if node in erased or node.op != "call_function" or _users(node) or effects:
            continue
        inputs = node.all_input_nodes
        for assertion in list(node.users):
            graph.erase_node(assertion)
            erased.add(assertion)
        graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)
    return erased


def _has_effects(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.is_impure() or (schema is not None and schema.is_mutable)
