"""Patterns as data: Op / Var / AnyOf matched against fx nodes, with consistent bindings,
commutative operands, literal and keyword arguments, overload packets, one-user and
optional-cast checks; rule tables and the driver that applies them; a pass written as one."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import rewrite
from rewrite import zoo
from rewrite.capture import capture
from rewrite.graph import ASSERT_METADATA, module_path, replace_by_example
from rewrite.pass_infra import Pass, PassResult
from rewrite.pattern import (
    AnyOf,
    Match,
    Op,
    Rule,
    Rules,
    Var,
    _erase_dead,
    _same,
    any_of,
    maybe,
    maybe_cast,
    op,
    var,
)

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


# -- keyword arguments, overloads, one user, casts ------------------------------------------


class Attention(nn.Module):
    def forward(self, q):
        causal = F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5)
        return causal, F.scaled_dot_product_attention(q, q, q)


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


def test_keyword_patterns_match_given_positional_and_default_arguments():
    gm = capture(Attention(), (torch.randn(2, 2, 4, 8),)).graph_module
    # torch.export passes is_causal positionally and scale by keyword; the plain call gives neither
    causal, plain = _calls(gm, aten.scaled_dot_product_attention.default)
    q = var("q")
    attention = op(aten.scaled_dot_product_attention.default, q, q, q, is_causal=var("causal"), scale=var("scale"))
    m = attention.match(causal)
    assert m["causal"] is True and m["scale"] == 0.5 and m["q"].op == "placeholder"
    m = attention.match(plain)
    assert m["causal"] is False and m["scale"] is None  # the schema's defaults
    is_causal = op(aten.scaled_dot_product_attention.default, var(), var(), var(), is_causal=True)
    assert is_causal.match(causal) is not None and is_causal.match(plain) is None
    assert op(aten.scaled_dot_product_attention.default, var(), scale=0.5).match(plain) is None
    assert op(aten.scaled_dot_product_attention.default, var(), causal=True).match(causal) is None  # no such argument


def test_positional_patterns_past_the_given_arguments_take_the_schema_default():
    g = Graph()
    mean = g.call(aten.mean.dim, g.x, [-1])
    assert op(aten.mean.dim, var(), [-1], False).match(mean) is not None  # keepdim defaults to False
    assert op(aten.mean.dim, var(), [-1], True).match(mean) is None
    assert op(aten.mean.dim, var(), [-1], var(), var()).match(mean) is None  # dtype is keyword-only
    gelu = g.call(aten.gelu.default, g.x, approximate="tanh")
    assert op(aten.gelu.default, var(), approximate="tanh").match(gelu) is not None
    assert op(aten.gelu.default, var(), approximate="none").match(g.call(aten.gelu.default, g.x)) is not None


def test_an_overload_packet_matches_every_overload_of_the_op():
    g = Graph()
    add_tensor = g.call(aten.add.Tensor, g.x, g.y)
    add_scalar = g.call(aten.add.Scalar, g.x, 2)
    sub = g.call(aten.sub.Tensor, g.x, g.y)
    assert all(op(aten.add, var(), var()).match(n) is not None for n in (add_tensor, add_scalar))
    assert op(aten.add, var(), var()).match(sub) is None
    assert op(aten.add.Tensor, var(), var()).match(add_scalar) is None
    assert op((aten.add, aten.sub.Tensor), var(), var()).match(sub) is not None  # packets and overloads mix
    gm = capture(Attention(), (torch.randn(2, 2, 4, 8),)).graph_module
    assert len([n for n in gm.graph.nodes if op(aten.scaled_dot_product_attention, var()).match(n)]) == 2


def test_one_user_ignores_metadata_assertions():
    class TwoReaders(nn.Module):
        def forward(self, x):
            e = torch.exp(x)
            return torch.softmax(x, -1).to(torch.float64), e * 2, e + 1

    gm = capture(TwoReaders(), (torch.randn(2, 8),)).graph_module
    (exp,) = _calls(gm, aten.exp.default)
    (softmax,) = _calls(gm, aten.softmax.int)
    assert any(u.target is ASSERT_METADATA for u in softmax.users)  # torch.export checks the dtype before .to
    assert op(aten.softmax, var(), one_user=True).match(softmax) is not None
    assert op(aten.exp, var(), one_user=True).match(exp) is None
    assert op(aten.exp, var()).match(exp) is not None
    mul = next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)
    assert op(aten.mul, op(aten.exp, var(), one_user=True), 2).match(mul) is None  # checked inside a tree too


def test_maybe_cast_looks_through_one_dtype_only_cast():
    class Casts(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1).to(torch.float64), torch.softmax(x, 0)

    gm = capture(Casts(), (torch.randn(2, 8),)).graph_module
    cast, plain = gm.graph.output_node().args[0]
    pattern = maybe_cast(op(aten.softmax, var("x"), var("dim")), name="cast")
    m = pattern.match(cast)
    assert m["dim"] == -1 and m["cast"] is cast and m.nodes == [cast, cast.args[0]]
    m = pattern.match(plain)
    assert m["dim"] == 0 and "cast" not in m.bindings
    assert maybe_cast(var("v")).match(cast)["v"] is cast.args[0]  # the cast is tried first


def test_maybe_cast_refuses_casts_that_move_or_reformat():
    g = Graph()
    g.x.meta["val"] = torch.empty(2, 3)
    cpu = torch.device("cpu")
    inner = var("x")
    casts = {
        "to.dtype": g.call(aten.to.dtype, g.x, torch.float16),
        "convert_element_type": g.call(torch.ops.prims.convert_element_type.default, g.x, torch.float16),
        "_to_copy": g.call(aten._to_copy.default, g.x, dtype=torch.float16),
        "_to_copy on its own device": g.call(aten._to_copy.default, g.x, dtype=torch.float16, device=cpu),
    }
    for what, node in casts.items():
        assert maybe_cast(inner).match(node)["x"] is g.x, what
    moves = g.call(aten._to_copy.default, g.x, dtype=torch.float16, device=torch.device("meta"))
    reformats = g.call(aten.to.dtype, g.x, torch.float16, memory_format=torch.channels_last)
    reformats_positionally = g.call(aten.to.dtype, g.x, torch.float16, False, False, torch.channels_last)
    sparse = g.call(aten._to_copy.default, g.x, layout=torch.sparse_coo)
    for node in (moves, reformats, reformats_positionally, sparse):
        assert maybe_cast(inner).match(node)["x"] is node  # only the second option: x is the cast itself


# -- rules and the driver ------------------------------------------------------------------


class Swish(nn.Module):
    def forward(self, h):
        return h * torch.sigmoid(h)


class TwoSwishes(nn.Module):
    """x * sigmoid(x) in both operand orders, each in a module of its own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.act = Swish()

    def forward(self, x):
        h = self.act(self.fc1(x))
        g = self.fc2(h)
        return torch.sigmoid(g) * g


x_ = var("x")
SWISH = op(aten.mul, x_, op(aten.sigmoid, x_), commutative=True)
TO_SILU = Rule(SWISH, lambda m: replace_by_example(m, aten.silu.default, m["x"]), what="x * sigmoid(x)")


def _swishes():
    return capture(TwoSwishes(), (torch.randn(4, 8),)).graph_module


def test_rules_try_rules_in_order_and_none_falls_through():
    gm = _swishes()
    tried = []

    def declines(m):
        tried.append(m.root.name)
        return None

    rules = Rules(Rule(SWISH, declines), TO_SILU, Rule(SWISH, lambda m: pytest.fail("a later rule ran")))
    result = rules.apply(gm)
    assert tried == ["mul", "mul_1"]
    assert [(c.node, c.before, c.after) for c in result.changes] == [
        ("mul", "x * sigmoid(x)", "aten.silu"),
        ("mul_1", "x * sigmoid(x)", "aten.silu"),
    ]
    assert [c.where for c in result.changes] == ["act", ""]
    assert result.skipped == []


def test_rules_compose_with_plus_in_order():
    to_relu = Rule(SWISH, lambda m: replace_by_example(m, aten.relu.default, m["x"]))
    gm = _swishes()
    result = (Rules(to_relu) + Rules(TO_SILU)).apply(gm)
    assert len(_calls(gm, aten.relu.default)) == 2 and not _calls(gm, aten.silu.default)
    assert result.changes[0].before == "aten.mul.Tensor"  # a rule that does not say what it matches
    gm = _swishes()
    (Rules(TO_SILU) + Rules(to_relu)).apply(gm)
    assert len(_calls(gm, aten.silu.default)) == 2 and not _calls(gm, aten.relu.default)
    assert len(Rules(TO_SILU) + Rules(to_relu, TO_SILU)) == 3


def test_a_skip_is_recorded_with_its_node_and_reason_and_stops_the_rules():
    gm = _swishes()
    in_act = lambda m: module_path(m.root) == "act"  # noqa: E731
    rules = Rules(Rule(SWISH, lambda m: m.skip("kept for the test") if in_act(m) else None), TO_SILU)
    result = rules.apply(gm, fixed_point=True)
    skips = [(s.node, s.where, s.op, s.reason) for s in result.skipped]
    assert skips == [("mul", "act", "aten.mul.Tensor", "kept for the test")]
    assert [c.node for c in result.changes] == ["mul_1"]  # the skipped node was not rewritten by the next rule
    assert len(_calls(gm, aten.sigmoid.default)) == 1  # each walk skips it again; it is reported once


def test_the_replacement_takes_over_the_users_and_dead_nodes_go():
    gm = _swishes()
    x = torch.randn(3, 8)
    expected = gm(x)
    Rules(TO_SILU).apply(gm)
    assert not _calls(gm, aten.sigmoid.default) and not _calls(gm, aten.mul.Tensor)
    torch.testing.assert_close(gm(x), expected)  # recompiled: runs the new graph


class HandWrittenSigmoids(nn.Module):
    def forward(self, x):
        y = x / (1 + torch.exp(-x))
        return y / (1 + torch.exp(-y))


# x / (1 + exp(-x)) -> x * sigmoid(x): the new mul is only seen by the next walk
HAND_SIGMOID = Rule(
    op(aten.div, x_, op(aten.add, op(aten.exp, op(aten.neg, x_)), 1, commutative=True)),
    lambda m: replace_by_example(m, lambda x: x * torch.sigmoid(x), m["x"]),
)


def test_fixed_point_repeats_walks_until_nothing_changes():
    x = torch.randn(4, 8)
    gm = capture(HandWrittenSigmoids(), (x,)).graph_module
    expected = gm(x)
    once = Rules(HAND_SIGMOID, TO_SILU).apply(gm)
    assert len(once.changes) == 2 and len(_calls(gm, aten.mul.Tensor)) == 2 and not _calls(gm, aten.silu.default)

    gm = capture(HandWrittenSigmoids(), (x,)).graph_module
    result = Rules(HAND_SIGMOID, TO_SILU).apply(gm, fixed_point=True)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not ASSERT_METADATA]
    assert calls == [aten.silu.default, aten.silu.default]  # silu(silu(x)); neg, exp, add, div gone
    assert [c.after for c in result.changes] == ["aten.mul.Tensor", "aten.mul.Tensor", "aten.silu", "aten.silu"]
    torch.testing.assert_close(gm(x), expected)


def test_rules_that_never_settle_raise_after_the_walk_limit():
    gm = _swishes()
    swap = Rule(op(aten.mul, var("a"), var("b")), lambda m: replace_by_example(m, lambda a, b: b * a, m["a"], m["b"]))
    with pytest.raises(RuntimeError, match="after 3 walks"):
        Rules(swap).apply(gm, fixed_point=True, max_walks=3)
    assert len(Rules(swap).apply(_swishes()).changes) == 2  # one walk: fine


def test_a_replacement_of_another_shape_or_kind_is_refused():
    gm = _swishes()
    with pytest.raises(ValueError, match=r"mul \(f32\[s\d+, 16\]\) by sum"):
        Rules(Rule(SWISH, lambda m: replace_by_example(m, torch.sum, m["x"]))).apply(gm)
    with pytest.raises(TypeError, match="returned str"):
        Rules(Rule(SWISH, lambda m: "silu")).apply(_swishes())


def test_dead_code_removal_keeps_nodes_with_effects():
    g = fx.Graph()
    x = g.placeholder("x")
    bumped = g.call_function(aten.add_.Tensor, (x, 1))  # in place: x changes even if no one reads it
    noise = g.call_function(aten.rand_like.default, (x,))  # random: it advances the generator
    total = g.call_function(aten.add.Tensor, (g.call_function(aten.neg.default, (bumped,)), noise))
    root = g.call_function(aten.relu.default, (total,))
    check = g.call_function(ASSERT_METADATA, (root,), {"dtype": torch.float32})
    g.output(x)
    erased = _erase_dead(g, root)
    assert {n.target for n in erased} == {aten.relu.default, ASSERT_METADATA, aten.add.Tensor, aten.neg.default}
    assert check in erased
    assert [n.op for n in g.nodes] == ["placeholder", "call_function", "call_function", "output"]


# -- a pass written as a rule table --------------------------------------------------------


@dataclass(frozen=True)
class SiluFromSigmoid(Pass):
    """x * sigmoid(x) -> silu(x): one op, one saved tensor instead of two."""

    name: ClassVar[str] = "silu_from_sigmoid"
    rules: ClassVar[Rules] = Rules(TO_SILU)

    def run(self, gm, ctx) -> PassResult:
        return self.rules.apply(gm)


def test_a_pass_written_as_rules_runs_through_optimize_exactly():
    model = TwoSwishes()
    x = torch.randn(4, 8)
    m = rewrite.optimize(model, [SiluFromSigmoid()], (x,))  # verify: outputs and gradients to rounding
    (entry,) = m.report.passes
    assert [(c.where, c.after) for c in entry.changes] == [("act", "aten.silu"), ("", "aten.silu")]
    assert entry.numerics.forward_within_rounding and entry.numerics.backward_within_rounding
    assert len(_calls(m.after, aten.silu.default)) == 2 and not _calls(m.after, aten.sigmoid.default)
    torch.testing.assert_close(m(x), model(x))
    m(x).sum().backward()
    assert m.fc1.weight.grad is not None


def test_a_replaced_root_goes_even_when_it_has_effects():
    """The rule that replaced an in-place root answers for it; what fed it still stays only if pure."""
    g = fx.Graph()
    x = g.placeholder("x")
    noise = g.call_function(aten.rand_like.default, (x,))
    root = g.call_function(aten.relu_.default, (g.call_function(aten.add.Tensor, (x, noise)),))
    g.output(root)
    new = g.call_function(aten.relu.default, (root.args[0],))
    root.replace_all_uses_with(new)
    assert _erase_dead(g, root) == set()  # not replaced: its effects keep it
    assert {n.target for n in _erase_dead(g, root, replaced=True)} == {aten.relu_.default}
    assert noise in g.nodes and root not in g.nodes


def test_leaving_skips_the_named_nodes_with_their_reasons_and_rewrites_the_rest():
    gm = _swishes()
    names = [n.name for n in gm.graph.nodes if SWISH.match(n)]
    assert len(names) == 2
    result = Rules(TO_SILU).leaving({names[0]: "kept for a reason"}).apply(gm)
    assert [c.node for c in result.changes] == [names[1]]
    assert [(s.node, s.reason) for s in result.skipped] == [(names[0], "kept for a reason")]
    assert Rules(TO_SILU).leaving({}).rules == (TO_SILU,)  # nothing to leave: the table as it is
