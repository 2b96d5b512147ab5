"""Patterns as data: Op / Var / AnyOf matched against fx nodes, with consistent bindings,
commutative operands, literal arguments, options tried in order, and rules built on them."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from rewrite import zoo
from rewrite.pattern import AnyOf, Match, Op, Rule, Var, _same, any_of, maybe, op, var

aten = torch.ops.aten


class Graph:
    """A hand-built aten graph: the tests control every argument (literals included)."""

    def __init__(self):
        self.graph = fx.Graph()
        self.x = self.graph.placeholder("x")
        self.y = self.graph.placeholder("y")

    def call(self, target, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)


def _export(model, *args):
    return torch.export.export(model, args, strict=False).module()


# -- Var and Op ----------------------------------------------------------------------------


def test_op_binds_arguments_and_lists_the_matched_nodes_root_first():
    g = Graph()
    inner = g.call(aten.rsqrt.default, g.y)
    root = g.call(aten.mul.Tensor, g.x, inner)
    m = op(aten.mul.Tensor, var("a"), op(aten.rsqrt.default, var("b"))).match(root)
    assert isinstance(m, Match)
    assert m.root is root
    assert m["a"] is g.x and m["b"] is g.y
    assert m.nodes == [root, inner]
    assert m.get("missing") is None and m.get("missing", 3) == 3
    with pytest.raises(KeyError):
        m["missing"]


def test_op_rejects_other_targets_non_calls_and_too_few_arguments():
    g = Graph()
    gelu = g.call(aten.gelu.default, g.x)
    add = g.call(aten.add.Tensor, g.x, g.y)
    assert op(aten.relu.default, var()).match(gelu) is None
    assert op(aten.gelu.default, var()).match(g.x) is None  # a placeholder is not a call
    assert op(aten.gelu.default, var(), var()).match(gelu) is None  # gelu has one positional argument
    assert op(aten.add.Tensor, var("a")).match(add)["a"] is g.x  # only the leading arguments are checked
    either = op((aten.gelu.default, aten.silu.default), var("a"))
    silu = g.call(aten.silu.default, g.y)
    assert either.match(gelu)["a"] is g.x and either.match(silu)["a"] is g.y
    assert either.match(add) is None


def test_a_name_bound_twice_must_bind_the_same_node():
    g = Graph()
    square = g.call(aten.mul.Tensor, g.x, g.x)
    product = g.call(aten.mul.Tensor, g.x, g.y)
    pattern = op(aten.mul.Tensor, var("a"), var("a"))
    m = pattern.match(square)
    assert m is not None and m["a"] is g.x
    assert pattern.match(product) is None
    # the same holds across levels of the tree
    nested = op(aten.add.Tensor, var("a"), op(aten.exp.default, var("a")))
    same = g.call(aten.add.Tensor, g.x, g.call(aten.exp.default, g.x))
    other = g.call(aten.add.Tensor, g.x, g.call(aten.exp.default, g.y))
    assert nested.match(same)["a"] is g.x
    assert nested.match(other) is None


def test_a_named_op_binds_its_node_and_must_be_the_same_node_twice():
    g = Graph()
    e = g.call(aten.exp.default, g.x)
    e2 = g.call(aten.exp.default, g.x)  # equal computation, a different node
    same = g.call(aten.mul.Tensor, e, e)
    different = g.call(aten.mul.Tensor, e, e2)
    pattern = op(aten.mul.Tensor, op(aten.exp.default, var(), name="e"), op(aten.exp.default, var(), name="e"))
    m = pattern.match(same)
    assert m is not None and m["e"] is e
    assert pattern.match(different) is None
    # a name shared between a Var and an Op refers to one node too
    mixed = op(aten.mul.Tensor, var("e"), op(aten.exp.default, var(), name="e"))
    assert mixed.match(same)["e"] is e
    assert mixed.match(different) is None


def test_where_filters_vars_and_ops():
    g = Graph()
    add_number = g.call(aten.add.Tensor, g.x, 1e-6)
    add_tensor = g.call(aten.add.Tensor, g.x, g.y)
    is_number = lambda v: isinstance(v, float)  # noqa: E731
    pattern = op(aten.add.Tensor, var("x"), var("eps", where=is_number))
    assert pattern.match(add_number)["eps"] == 1e-6
    assert pattern.match(add_tensor) is None
    on_x = op(aten.add.Tensor, var(), var(), where=lambda n: n.args[0] is g.x and n.args[1] is g.y)
    assert on_x.match(add_tensor) is not None and on_x.match(add_number) is None


# -- commutative ---------------------------------------------------------------------------


def test_commutative_tries_both_orders():
    g = Graph()
    r = g.call(aten.rsqrt.default, g.y)
    written_forwards = g.call(aten.mul.Tensor, r, g.x)
    written_backwards = g.call(aten.mul.Tensor, g.x, r)
    plain = op(aten.mul.Tensor, op(aten.rsqrt.default, var("v")), var("x"))
    both = op(aten.mul.Tensor, op(aten.rsqrt.default, var("v")), var("x"), commutative=True)
    assert plain.match(written_forwards) is not None
    assert plain.match(written_backwards) is None
    for node in (written_forwards, written_backwards):
        m = both.match(node)
        assert m is not None and m["x"] is g.x and m["v"] is g.y and m.nodes == [node, r]


def test_commutative_swaps_only_the_first_two_arguments():
    g = Graph()
    node = g.call(aten.addcmul.default, g.y, g.x, 7)
    assert op(aten.addcmul.default, var("a"), var("b"), 7, commutative=True).match(node) is not None
    assert op(aten.addcmul.default, g.x, g.y, 7, commutative=True).match(node) is not None  # swapped
    assert op(aten.addcmul.default, var(), 7, var(), commutative=True).match(node) is None


def test_commutative_backtracks_when_the_first_order_fails_deeper():
    g = Graph()
    e = g.call(aten.exp.default, g.x)
    node = g.call(aten.mul.Tensor, e, g.x)
    pattern = op(aten.mul.Tensor, var("a"), op(aten.exp.default, var("a")), commutative=True)
    # order 1: a=e, then exp(a) against x fails; order 2: a=x, exp(x) against e succeeds
    m = pattern.match(node)
    assert m is not None and m["a"] is g.x and m.nodes == [node, e]
    not_commutative = op(aten.mul.Tensor, var("a"), op(aten.exp.default, var("a")))
    assert not_commutative.match(node) is None


# -- literals ------------------------------------------------------------------------------


def test_literals_are_compared_with_equality():
    g = Graph()
    mean = g.call(aten.mean.dim, g.x, [-1], True)
    assert op(aten.mean.dim, var(), [-1], True).match(mean) is not None
    assert op(aten.mean.dim, var(), (-1,), True).match(mean) is not None  # list and tuple alike
    assert op(aten.mean.dim, var(), [1], True).match(mean) is None
    assert op(aten.mean.dim, var(), [-1], False).match(mean) is None
    pow_ = g.call(aten.pow.Tensor_Scalar, g.x, 2)
    assert op(aten.pow.Tensor_Scalar, var(), 2).match(pow_) is not None
    assert op(aten.pow.Tensor_Scalar, var(), 2.0).match(pow_) is not None  # 2 == 2.0
    assert op(aten.pow.Tensor_Scalar, var(), 3).match(pow_) is None
    assert op(aten.pow.Tensor_Scalar, g.x, 2).match(pow_) is not None  # a node literal: identity
    assert op(aten.pow.Tensor_Scalar, g.y, 2).match(pow_) is None


def test_keepdim_true_does_not_match_1():
    g = Graph()
    keep = g.call(aten.mean.dim, g.x, [1], True)
    one = g.call(aten.mean.dim, g.x, [1], 1)
    assert op(aten.mean.dim, var(), [1], True).match(keep) is not None
    assert op(aten.mean.dim, var(), [1], 1).match(keep) is None
    assert op(aten.mean.dim, var(), [1], True).match(one) is None
    assert op(aten.mean.dim, var(), [True], True).match(keep) is None  # dim 1 is not True either
    # a Var bound to True does not accept 1 at its second occurrence
    g2 = Graph()
    node = g2.call(aten.mean.dim, g2.call(aten.sum.dim_IntList, g2.x, [0], True), [0], 1)
    pattern = op(aten.mean.dim, op(aten.sum.dim_IntList, var(), var(), var("k")), var(), var("k"))
    assert pattern.match(node) is None
    same = g2.call(aten.mean.dim, g2.call(aten.sum.dim_IntList, g2.x, [0], True), [0], True)
    assert pattern.match(same)["k"] is True


@pytest.mark.parametrize(
    "a,b,same",
    [
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (True, True, True),
        (1, 1.0, True),
        ([1, 2], (1, 2), True),
        ([1, True], [1, 1], False),
        ([1, 2], [1, 2, 3], False),
        (None, None, True),
        (torch.float32, torch.float32, True),
        (torch.float32, torch.float16, False),
    ],
)
def test_same_compares_literals(a, b, same):
    assert _same(a, b) is same


def test_same_compares_nodes_by_identity():
    g = Graph()
    assert _same(g.x, g.x) and not _same(g.x, g.y)
    assert not _same(g.x, "x") and not _same(1, g.x)


# -- AnyOf and maybe -----------------------------------------------------------------------


def test_any_of_tries_options_in_order():
    g = Graph()
    gelu = g.call(aten.gelu.default, g.x)
    unwrap_first = any_of(op(aten.gelu.default, var("v")), var("v"))
    node_first = any_of(var("v"), op(aten.gelu.default, var("v")))
    assert unwrap_first.match(gelu)["v"] is g.x
    assert node_first.match(gelu)["v"] is gelu
    assert isinstance(unwrap_first, AnyOf) and len(unwrap_first.options) == 2
    assert any_of(op(aten.relu.default, var()), op(aten.silu.default, var())).match(gelu) is None


def test_any_of_backtracks_into_a_later_option():
    # mul(maybe-cast(x), x): the first option of the cast binds x to the cast's input; when
    # that is not the second operand, the second option (x = the cast itself) is tried.
    g = Graph()
    cast = g.call(aten.to.dtype, g.x, torch.float32)
    through_cast = g.call(aten.mul.Tensor, cast, g.x)
    cast_twice = g.call(aten.mul.Tensor, cast, cast)
    plain = g.call(aten.mul.Tensor, g.y, g.y)
    x = var("x")
    pattern = op(aten.mul.Tensor, maybe(aten.to.dtype, x, var()), x)
    assert pattern.match(through_cast)["x"] is g.x
    assert pattern.match(cast_twice)["x"] is cast
    assert pattern.match(plain)["x"] is g.y
    m = pattern.match(through_cast)
    assert m.nodes == [through_cast, cast]
    assert pattern.match(cast_twice).nodes == [cast_twice]


def test_maybe_names_the_wrapping_op():
    g = Graph()
    cast = g.call(aten.to.dtype, g.x, torch.float16)
    pattern = maybe(aten.to.dtype, var("x"), torch.float16, name="cast")
    m = pattern.match(cast)
    assert m["x"] is g.x and m["cast"] is cast
    assert maybe(aten.to.dtype, var("x"), torch.float32, name="cast").match(cast)["x"] is cast  # wrong dtype: cast is x
    assert "cast" not in pattern.match(g.y).bindings


def test_pattern_constructors_build_the_data():
    assert op(aten.relu.default, 1) == Op((aten.relu.default,), (1,))
    assert op([aten.relu.default, aten.gelu.default]).targets == (aten.relu.default, aten.gelu.default)
    assert var("a") == Var("a")
    assert any_of(var("a"), var("b")) == AnyOf((Var("a"), Var("b")))


# -- on captured graphs --------------------------------------------------------------------


def _rms_pattern():
    x = var("x")
    cast = lambda inner: maybe(aten.to.dtype, inner, var())  # noqa: E731
    variance = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, cast(x), 2), [-1], True)
    normed = op(
        aten.mul.Tensor,
        cast(x),
        op(aten.rsqrt.default, op(aten.add.Tensor, variance, var("eps"), commutative=True)),
        commutative=True,
    )
    return op(aten.mul.Tensor, var("weight"), cast(normed), commutative=True)


def test_hand_written_rms_norm_in_a_captured_graph():
    norm = zoo.RMSNorm(8, eps=1e-5)
    gm = _export(norm, torch.randn(2, 3, 8))
    pattern = _rms_pattern()
    matches = [m for n in gm.graph.nodes if (m := pattern.match(n)) is not None]
    assert len(matches) == 1
    m = matches[0]
    assert m.root is gm.graph.output_node().args[0][0]
    assert m["x"].op == "placeholder"
    assert m["eps"] == 1e-5
    assert m["weight"].op == "get_attr" and m["weight"].target == "weight"
    targets = {n.target for n in m.nodes}
    assert {aten.mul.Tensor, aten.rsqrt.default, aten.add.Tensor, aten.mean.dim, aten.pow.Tensor_Scalar} <= targets
    assert m.escaping() == []  # nothing inside is used outside (metadata assertions do not count)


def test_keepdim_false_is_not_an_rms_norm():
    class NotKeepdim(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)[..., None]

    class MeanOverDim1(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)

    normed = op(
        aten.mul.Tensor,
        var("x"),
        op(aten.rsqrt.default, op(aten.add.Tensor, op(aten.mean.dim, op(aten.pow.Tensor_Scalar, var("x"), 2), [-1], True), var())),
        commutative=True,
    )
    for model in (NotKeepdim(), MeanOverDim1()):
        gm = _export(model, torch.randn(2, 3, 8))
        assert all(normed.match(n) is None for n in gm.graph.nodes)


def test_escaping_lists_inner_nodes_used_outside_the_match():
    class Leaky(nn.Module):
        def forward(self, x):
            e = torch.exp(x)
            return torch.sin(e) * 2, e  # e escapes: it is an output too

    gm = _export(Leaky(), torch.randn(3))
    mul = next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    m = op(aten.mul.Tensor, op(aten.sin.default, op(aten.exp.default, var(), name="e")), 2).match(mul)
    assert m is not None
    assert m.escaping() == [m["e"]]
    sin_only = op(aten.mul.Tensor, op(aten.sin.default, var()), 2).match(mul)
    assert sin_only.escaping() == []


# -- rules ---------------------------------------------------------------------------------


def test_rule_apply_returns_none_without_a_match():
    calls = []

    def rewrite(m):
        calls.append(m)
        return f"relu of {m['x'].name}"

    rule = Rule("relu", op(aten.relu.default, var("x")), rewrite)
    g = Graph()
    relu = g.call(aten.relu.default, g.x)
    gelu = g.call(aten.gelu.default, g.x)
    assert rule.apply(gelu) is None
    assert calls == []
    assert rule.apply(relu) == "relu of x"
    assert len(calls) == 1 and calls[0].root is relu
    assert Rule("declines", op(aten.relu.default, var()), lambda m: None).apply(relu) is None


def test_rules_compose_first_applicable_wins():
    g = Graph()
    relu = g.call(aten.relu.default, g.x)
    gelu = g.call(aten.gelu.default, g.x)
    rules = [
        Rule("never", op(aten.relu.default, var()), lambda m: None),
        Rule("relu", op(aten.relu.default, var("x")), lambda m: "relu"),
        Rule("gelu", op(aten.gelu.default, var("x")), lambda m: "gelu"),
    ]

    def first(node):
        return next((r for rule in rules if (r := rule.apply(node)) is not None), None)

    assert first(relu) == "relu" and first(gelu) == "gelu" and first(g.x) is None
