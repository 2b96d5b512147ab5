"""The memory model on graphs small enough to check by hand: which nodes own memory
(rewrite.liveness, rewrite.node_kinds), the liveness simulation, the cost models
(rewrite.cost_models), writing a schedule back out as a graph and splitting the training step
on it (passes.remat.lower), and the live-storage tracker (rewrite.memory)."""

import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from rewrite import zoo
from rewrite.capture import capture
from passes.remat.lower import ScheduledTraining, realize
from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.memory import measure_peak
from rewrite.node_kinds import is_alias, is_random
from solvers.schedule import validate

aten = torch.ops.aten
MiB = 2**20


def _views_and_a_two_output_op(x, w):
    y = torch.mm(x, w)  # 4x5 float32: 80 bytes
    t = y.t()  # a view of y: an output, so y lasts to the end
    first, _ = torch.split(y, 2, dim=0)  # views of y
    z = first * 2  # 2x5: 40 bytes
    values, indices = torch.max(t, dim=1)  # two outputs: 5 float32 (20 bytes), 5 int64 (40 bytes)
    out = values + z.sum()  # sum: 4 bytes; out: 20 bytes
    return out, t, indices


@pytest.fixture
def hand_graph():
    return make_fx(_views_and_a_two_output_op)(torch.randn(4, 3), torch.randn(3, 5))


def _node(gm, target, index=None):
    found = [n for n in gm.graph.nodes if n.target is target]
    if index is not None:
        found = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0] is found[0] and n.args[1] == index]
    assert len(found) == 1, (target, index, found)
    return found[0]


def _flat_inputs(graph: fx.Graph, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    values = []
    for n in graph.nodes:
        if n.op == "placeholder":
            val = n.meta["val"]
            values.append(torch.randn(val.shape, generator=gen, dtype=val.dtype) if val.is_floating_point() else val.clone())
    return values


def _run_flat(graph: fx.Graph, inputs: list):
    """Run a graph on flat placeholder values, returning the output node's raw value."""
    gm = fx.GraphModule(torch.nn.Module(), graph)
    return fx.Interpreter(gm).run(*inputs, enable_io_processing=False)


# --------------------------------------------------------------------------- MemoryModel


def test_views_own_no_memory_and_each_output_of_a_multi_output_op_is_a_unit(hand_graph):
    model = MemoryModel.from_graph(hand_graph.graph)
    mm, mul, sum_, add = (_node(hand_graph, t) for t in (aten.mm.default, aten.mul.Tensor, aten.sum.default, aten.add.Tensor))
    max_op = _node(hand_graph, aten.max.dim)
    values, indices = _node(hand_graph, aten.max.dim, 0), _node(hand_graph, aten.max.dim, 1)

    # Units: the allocating ops, one per getitem of max; no view (t, split, split's getitems).
    assert set(model.order) == {mm.name, mul.name, sum_.name, add.name, values.name, indices.name}
    assert len(model.order) == len(model.units)
    for view in (_node(hand_graph, aten.t.default), _node(hand_graph, aten.split.Tensor)):
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


# --------------------------------------------------------------------------- realize


def test_realize_plain_schedule_gives_the_same_graph_outputs(hand_graph):
    model = MemoryModel.from_graph(hand_graph.graph)
    realized, when = realize(model, model.plain_intervals())
    realized.lint()
    assert not any(n.meta.get("recomputed") for n in realized.nodes)
    assert not any(n.name.endswith("_recomputed") for n in realized.nodes)
    inputs = [torch.randn(4, 3), torch.randn(3, 5)]
    want = hand_graph(*inputs)
    got = fx.GraphModule(hand_graph, realized)(*inputs)
    assert isinstance(got, tuple) and len(got) == len(want)  # same output structure
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # views are re-taken where they are read (unused ones dropped), so compare the peak
    assert max(liveness_profile(realized)) == max(liveness_profile(hand_graph.graph))


def _chain(x):
    a = torch.sin(x)
    b = torch.cos(a).repeat(4)  # four times a's size
    c = torch.exp(b)
    d = torch.tanh(c).sum()
    return d + a  # `a` is read again at the end: keeping or recomputing it is a choice


def test_realize_a_recomputation_copies_the_op_where_the_schedule_says():
    gm = make_fx(_chain)(torch.randn(64))
    model = MemoryModel.from_graph(gm.graph)
    names = {u.node.target: u.name for u in model.units}
    sin = names[aten.sin.default]
    position = {name: t for t, name in enumerate(model.order)}
    intervals = model.plain_intervals()
    add = position[names[aten.add.Tensor]]
    # sin: computed, read by cos, dropped, recomputed just before the add that reads it again.
    intervals[sin] = [(position[sin], position[names[aten.cos.default]]), (add, add)]
    validate(model.graph, model.order, intervals, keep=model.keep)
    realized, when = realize(model, intervals)
    realized.lint()
    copies = [n for n in realized.nodes if n.target is aten.sin.default]
    assert [n.name.endswith("_recomputed") for n in copies] == [False, True]
    assert copies[1].meta.get("recomputed") is True
    add_node = next(n for n in realized.nodes if n.target is aten.add.Tensor)
    assert copies[1] in add_node.all_input_nodes and copies[0] not in add_node.all_input_nodes
    assert when[copies[1]] == add
    x = torch.randn(64)
    torch.testing.assert_close(fx.GraphModule(gm, realized)(x), gm(x), rtol=0, atol=0)
    # the recomputation lowers the simulated peak: a no longer lives across exp and tanh
    assert max(liveness_profile(realized)) < max(liveness_profile(gm.graph))
    assert max(liveness_profile(realized)) == max(model.profile(intervals))


def _two_outputs_apart(x):
    m = x.exp()  # 8x64 float32: 2048 bytes
    values, indices = torch.max(m, dim=1)  # 8 float32 (32 bytes), 8 int64 (64 bytes)
    big = values.repeat(256)  # 8192 bytes: values is read again after it
    wide = big.sin()
    return wide.sum() + values.sum() + m.cos().sum(), indices


def test_a_tuple_holds_every_output_until_its_last_getitem():
    # max's indices are never taken apart: the tuple holds them until its last getitem
    def only_values(x):
        m = x.exp()  # 8x64 float32: 2048 bytes
        values = torch.max(m, dim=1)[0]  # 32 bytes; the indices (64 bytes) are not taken
        return (values * 2).sum()

    x = torch.randn(8, 64)
    gm = make_fx(only_values)(x)
    profile = liveness_profile(gm.graph)
    nodes = list(gm.graph.nodes)
    at = {n.target: i for i, n in enumerate(nodes)}
    # at max: m (2048) + values (32) + indices (64); m is freed after max, the indices
    # after the getitem
    assert profile[at[aten.max.dim]] == 2048 + 32 + 64
    assert profile[at[operator.getitem]] == 32 + 64
    assert profile[at[aten.mul.Tensor]] == 32 + 32
    assert max(profile) == measure_peak(lambda: _run_flat(gm.graph, [x]))


def test_realize_takes_a_multi_output_op_apart_at_once():
    x = torch.randn(8, 64)
    gm = make_fx(_two_outputs_apart)(x)
    model = MemoryModel.from_graph(gm.graph)
    position = {name: t for t, name in enumerate(model.order)}
    names = {(u.node.target, u.index): u.name for u in model.units}
    values, indices = names[aten.max.dim, 0], names[aten.max.dim, 1]
    exp, repeat = names[aten.exp.default, None], names[aten.repeat.default, None]
    (again,) = set(model.graph.successors(values)) - {repeat}  # values.sum()
    (cos,) = set(model.graph.successors(exp)) - {values, indices}
    intervals = model.plain_intervals()
    # values: dropped after the repeat and recomputed (with max) just before its other read;
    # m: dropped after max and recomputed while max's outputs are being taken apart (at the
    # position of its second output), for the cos
    intervals[values] = [(position[values], position[repeat]), (position[again], position[again])]
    intervals[exp] = [(position[exp], position[indices]), (position[values], position[cos])]
    validate(model.graph, model.order, intervals, keep=model.keep)
    realized, _ = realize(model, intervals)
    nodes = list(realized.nodes)
    for i, node in enumerate(nodes):
        if node.target is aten.max.dim:
            taken = [u for u in node.users if u.target is operator.getitem]
            assert {nodes.index(u) for u in taken} == set(range(i + 1, i + 1 + len(taken))), node.name
    # the recomputed max's indices are allocated again (not taken, freed with the tuple)
    assert max(liveness_profile(realized)) == measure_peak(lambda: _run_flat(realized, [x]))
    got = fx.GraphModule(gm, realized)(x)
    for g, w in zip(got, gm(x)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_realize_rejects_a_schedule_that_drops_a_needed_tensor():
    gm = make_fx(_chain)(torch.randn(8))
    model = MemoryModel.from_graph(gm.graph)
    sin = next(u.name for u in model.units if u.node.target is aten.sin.default)
    intervals = model.plain_intervals()
    intervals[sin] = [(intervals[sin][0][0], intervals[sin][0][0] + 1)]  # not alive at the add
    with pytest.raises(ValueError, match=sin):
        realize(model, intervals)


# --------------------------------------------------------------------------- traced joint graph


def _plain_planner(seen: dict):
    def plan(model: MemoryModel) -> dict:
        seen["model"] = model
        return model.plain_intervals()

    return plan


def test_joint_graph_memory_model_and_plain_realization():
    torch.manual_seed(0)
    model = zoo.mlp(in_features=16, hidden=32, depth=2, classes=4)
    x = torch.randn(64, 16)
    gm = capture(model, (x,), None, mode="train").graph_module
    seen = {}
    step = ScheduledTraining(_plain_planner(seen))
    part = step.prepare(gm, (x,), {})
    memory = seen["model"]
    joint = memory.fx_graph

    # aliases (views, transposes, getitems of views) own no memory
    for node in joint.nodes:
        if is_alias(node) and not (node.target is operator.getitem and node.name in memory.graph):
            assert node.name not in memory.graph
    # every output of the joint graph (forward outputs and gradients) is kept to the end
    output = next(n for n in joint.nodes if n.op == "output")
    outs = [a for a in output.all_input_nodes if memory.root.get(a) is not None]
    assert outs and memory.keep == {memory.root[a] for a in outs}
    # native_layer_norm's outputs are separate units
    norm_units = [u for u in memory.units if u.node.target is aten.native_layer_norm.default]
    assert norm_units and all(u.index is not None for u in norm_units)

    # the plain schedule: nothing recomputed, the realized graph computes what the joint does
    assert part.recomputed == []
    assert not any(n.meta.get("recomputed") for n in part.joint.nodes)
    assert part.simulated_peak == part.plain_peak == max(liveness_profile(joint))
    inputs = _flat_inputs(joint)
    want = _run_flat(joint, inputs)
    got = _run_flat(part.joint, inputs)
    want_flat = [t for t in torch.utils._pytree.tree_leaves(want)]
    got_flat = [t for t in torch.utils._pytree.tree_leaves(got)]
    assert len(got_flat) == len(want_flat)
    for g, w in zip(got_flat, want_flat):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=0, atol=0)

    # and the compiled step trains like the model
    params = list(gm.parameters())
    weight = torch.randn(64, 4)
    got_grads = torch.autograd.grad((step(gm, (x,), {}) * weight).sum(), params)
    want_grads = torch.autograd.grad((model(x) * weight).sum(), list(model.parameters()))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- measure_peak


def test_measure_peak_of_known_allocations():
    def free_then_allocate():
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        del a
        b = torch.empty(8 * MiB, dtype=torch.uint8)
        del b

    def hold_then_allocate():
        a = torch.empty(MiB, dtype=torch.float32)  # 4 MiB
        b = torch.empty(2 * MiB, dtype=torch.float32)  # 8 MiB, while a is alive
        return a, b

    assert measure_peak(free_then_allocate) == 8 * MiB
    assert measure_peak(hold_then_allocate) == 12 * MiB


def test_measure_peak_ignores_views_in_place_ops_and_what_existed_before():
    existing = torch.zeros(MiB, dtype=torch.float32)

    def fn():
        v = existing.view(-1, 16)  # a view: no allocation
        existing.add_(1)  # in place: no allocation
        v.t()
        c = existing * 2  # 4 MiB
        c.mul_(3)
        del c
        return torch.ones(MiB // 2, dtype=torch.float32)  # 2 MiB

    assert measure_peak(fn) == 4 * MiB


# --------------------------------------------------------------------------- cost models


def _mm_then_floor_divide(x, w, a, b):
    return torch.mm(x, w).relu(), torch.floor_divide(a, b)


@pytest.fixture
def costed_graph():
    # fake tensors, as AOTAutograd's joint graph has them (the FLOP counter runs on them)
    return make_fx(_mm_then_floor_divide, tracing_mode="fake")(
        torch.randn(64, 32), torch.randn(32, 16), torch.ones(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64)
    )


def test_cost_models_price_an_op_by_its_flops_and_bytes(costed_graph):
    from rewrite.cost_models import FLOPS_PER_BYTE

    mm = _node(costed_graph, aten.mm.default)
    relu = _node(costed_graph, aten.relu.default)
    flops = 2 * 64 * 32 * 16
    mm_moved = (64 * 32 + 32 * 16 + 64 * 16) * 4
    relu_moved = 2 * 64 * 16 * 4
    roofline = MemoryModel.from_graph(costed_graph.graph, cost="roofline").graph.nodes
    assert roofline[mm.name]["cost"] == max(flops, FLOPS_PER_BYTE * mm_moved) == FLOPS_PER_BYTE * mm_moved
    assert roofline[relu.name]["cost"] == FLOPS_PER_BYTE * relu_moved
    by_flops = MemoryModel.from_graph(costed_graph.graph).graph.nodes  # the default
    assert by_flops[mm.name]["cost"] == flops + mm_moved
    assert by_flops[relu.name]["cost"] == relu_moved
    # the flops model reverses the roofline's order of a matmul and a pointwise op over more bytes
    assert by_flops[mm.name]["cost"] > 5 * by_flops[relu.name]["cost"]
    assert roofline[mm.name]["cost"] < 2 * roofline[relu.name]["cost"]
    assert all(d["cost"] == 0 for _, d in MemoryModel.from_graph(costed_graph.graph, cost=None).graph.nodes(data=True))
    with pytest.raises(ValueError, match="cost model 'time'.*flops, roofline, measured"):
        MemoryModel.from_graph(costed_graph.graph, cost="time")


def test_measured_costs_time_what_runs_and_scale_the_roofline_for_the_rest(costed_graph):
    from rewrite.cost_models import _measured_costs, measure_op_times

    mm = _node(costed_graph, aten.mm.default)
    relu = _node(costed_graph, aten.relu.default)
    divide = next(n for n in costed_graph.graph.nodes if "div" in str(n.target))
    state = torch.random.get_rng_state()
    times = measure_op_times([mm, relu, divide])
    assert torch.equal(torch.random.get_rng_state(), state)  # its random inputs come from its own generator
    assert times[mm] > 0 and times[relu] > 0
    assert times[divide] is None  # integer division by the zeros it is given: cannot run
    roofline = {mm: 100.0, relu: 50.0, divide: 80.0}
    costs = _measured_costs(roofline)
    assert costs[mm] > 0 and costs[relu] > 0
    # the untimed op costs its roofline at the median nanoseconds per roofline unit of the others
    per_unit = sorted([costs[mm] / 100.0, costs[relu] / 50.0])[1]
    assert costs[divide] == pytest.approx(80.0 * per_unit)


def test_ops_of_one_signature_are_timed_once_and_cost_the_same():
    from rewrite.cost_models import measure_op_times

    def two_equal_matmuls(x, w, v):
        return torch.mm(x, w), torch.mm(x, v), torch.mm(x.t().contiguous(), x)

    gm = make_fx(two_equal_matmuls, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 16), torch.randn(32, 16))
    first, second, other = [n for n in gm.graph.nodes if n.target is aten.mm.default]
    times = measure_op_times([first, second, other])
    assert times[first] == times[second] > 0  # one timing: equal to the last bit
    assert times[other] > 0 and times[other] != times[first]
    costs = MemoryModel.from_graph(gm.graph, cost="measured").graph.nodes
    assert costs[first.name]["cost"] == costs[second.name]["cost"]


def test_ops_are_timed_for_real_under_a_fake_mode():
    # AOTAutograd calls the partition function under its FakeTensorMode: a timing taken there
    # without leaving it would time fake tensors (microseconds, whatever the op)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rewrite.cost_models import measure_op_times

    gm = make_fx(torch.mm, tracing_mode="fake")(torch.randn(512, 512), torch.randn(512, 512))
    mm = _node(gm, aten.mm.default)
    outside = min(measure_op_times([mm])[mm] for _ in range(3))
    with FakeTensorMode():
        inside = min(measure_op_times([mm])[mm] for _ in range(3))
    assert outside / 3 < inside < outside * 3


def test_random_ops_are_not_timed_and_the_random_state_is_left_alone():
    from rewrite.cost_models import measure_op_times

    gm = make_fx(lambda x: torch.nn.functional.dropout(x, 0.5, True) * 2, tracing_mode="fake")(torch.randn(64, 64))
    drop = next(n for n in gm.graph.nodes if is_random(n))
    double = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor][-1]  # the "* 2"
    state = torch.random.get_rng_state()
    times = measure_op_times([drop, double])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert times[drop] is None and times[double] > 0
