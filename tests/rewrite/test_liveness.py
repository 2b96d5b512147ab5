"""The memory model on graphs small enough to check by hand: which nodes own memory
(rewrite.liveness, rewrite.node_kinds) and the liveness simulation."""

import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.node_kinds import is_alias, is_random
from solvers.schedule import validate
from helpers import node_of, views_and_a_two_output_op

aten = torch.ops.aten


@pytest.fixture
def hand_graph():
    return make_fx(views_and_a_two_output_op)(torch.randn(4, 3), torch.randn(3, 5))


# --------------------------------------------------------------------------- MemoryModel


def test_views_own_no_memory_and_each_output_of_a_multi_output_op_is_a_unit(hand_graph):
    model = MemoryModel.from_graph(hand_graph.graph)
    mm, mul, sum_, add = (node_of(hand_graph, t) for t in (aten.mm.default, aten.mul.Tensor, aten.sum.default, aten.add.Tensor))
    max_op = node_of(hand_graph, aten.max.dim)
    values, indices = node_of(hand_graph, aten.max.dim, 0), node_of(hand_graph, aten.max.dim, 1)

    # Units: the allocating ops, one per getitem of max; no view (t, split, split's getitems).
    assert set(model.order) == {mm.name, mul.name, sum_.name, add.name, values.name, indices.name}
    assert len(model.order) == len(model.units)
    for view in (node_of(hand_graph, aten.t.default), node_of(hand_graph, aten.split.Tensor)):
        assert is_alias(view) and model.root[view] == mm.name
    for split_part in (n for n in hand_graph.graph.nodes if n.target is operator.getitem and n.args[0].target is aten.split.Tensor):
        assert model.root[split_part] == mm.name
    mem = {name: model.graph.nodes[name]["mem"] for name in model.order}
    assert mem == {mm.name: 80, mul.name: 40, sum_.name: 4, add.name: 20, values.name: 20, indices.name: 40}

    # max's two outputs: separate units at consecutive positions (largest first) of one op.
    parts = [u for u in model.units if u.node is max_op]
    assert [(u.name, u.index) for u in parts] == [(indices.name, 1), (values.name, 0)]
    position = {name: t for t, name in enumerate(model.order)}
    assert position[values.name] == position[indices.name] + 1

    # Edges go through views to the storage they alias.
    assert set(model.graph.edges) == {
        (mm.name, mul.name),  # mul reads split's view of mm
        (mm.name, values.name),  # max reads t, a view of mm
        (mm.name, indices.name),
        (mul.name, sum_.name),
        (values.name, add.name),
        (sum_.name, add.name),
    }
    # keep: what the outputs live in (t is a view of mm, so mm stays to the end).
    assert model.keep == {add.name, mm.name, indices.name}
    assert all(model.graph.nodes[n]["cost"] > 0 and model.graph.nodes[n]["recompute"] for n in model.order)
    validate(model.graph, model.order, model.plain_intervals(), keep=model.keep)


def test_liveness_profile_of_a_hand_graph(hand_graph):
    # nodes: x, w, mm, t, split, getitem, getitem_1, mul, max, getitem, getitem, sum, add, output
    expected = [0, 0, 80, 80, 80, 80, 80, 120, 180, 180, 180, 184, 164, 140]
    #                  mm ---------------------------------------------- (kept: t is an output)
    #                                      mul ---------------- (freed after sum)
    #                                           max's outputs: values freed after add, indices kept
    assert liveness_profile(hand_graph.graph) == expected


def test_plain_interval_profile_agrees_with_the_liveness_profile(hand_graph):
    model = MemoryModel.from_graph(hand_graph.graph)
    assert max(model.profile(model.plain_intervals())) == max(liveness_profile(hand_graph.graph))


def test_random_and_alias_classification():
    def f(x):
        dropped, _ = aten.native_dropout(x, 0.5, True)
        kept, _ = aten.native_dropout(x, 0.0, True)  # p=0: deterministic
        off, _ = aten.native_dropout(x, 0.5, False)  # not training: deterministic
        return dropped.view(-1), kept, off, torch.rand(3), x.t()

    gm = make_fx(f)(torch.randn(4, 4))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    dropouts = [n for n in nodes if n.target is aten.native_dropout.default]
    assert [is_random(n) for n in dropouts] == [True, False, False]
    assert is_random(next(n for n in nodes if n.target is aten.rand.default))
    assert is_alias(next(n for n in nodes if n.target is aten.view.default))
    assert is_alias(next(n for n in nodes if n.target is aten.t.default))
    assert not any(is_alias(n) for n in dropouts)
