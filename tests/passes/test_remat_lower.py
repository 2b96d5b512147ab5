"""Writing a schedule back out as a graph and splitting the training step on it
(passes.remat.lower), on graphs small enough to check by hand."""

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from passes import Remat
from passes.remat.lower import ScheduledTraining, _forward_end, realize
from rewrite import optimize, zoo
from rewrite.capture import capture
from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.memory import measure_peak
from rewrite.node_kinds import is_alias, is_training_batch_norm
from rewrite.training_step import TRAINING_STEP
from solvers.schedule import validate
from helpers import views_and_a_two_output_op

aten = torch.ops.aten


@pytest.fixture
def hand_graph():
    return make_fx(views_and_a_two_output_op)(torch.randn(4, 3), torch.randn(3, 5))


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


# --------------------------------------------------------------------------- layouts the trace fixed


class _TransposedBatchNorm(nn.Module):
    """Blocks of Linear -> GELU -> BatchNorm1d over the features of a [B, T, C] sequence (taken
    as [B, C, T], a transposed view, and back), then a Linear. The CPU batch norm returns a
    contiguous tensor for the transposed input; its meta kernel, which the step is traced with,
    one strided like the input: the trace writes the next Linear's input as a ``view`` that
    only the traced layout allows."""

    def __init__(self, features: int = 16, blocks: int = 3):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(features, features) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm1d(features) for _ in range(blocks))
        self.head = nn.Linear(features, features)

    def forward(self, x):
        for linear, norm in zip(self.linears, self.norms):
            x = norm(F.gelu(linear(x)).transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def _assert_trains_like(module, reference, inputs: list[torch.Tensor], steps: int = 2):
    """``steps`` training steps of a random projection of the output: gradients and batch-norm
    statistics equal the eager reference's."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = inputs[step % len(inputs)]
        out = reference(x)
        weight = torch.randn(out.shape, generator=gen)
        want = torch.autograd.grad((out * weight).sum(), list(reference.parameters()))
        got = torch.autograd.grad((module(x) * weight).sum(), list(module.parameters()))
        for (name, _), g, w in zip(reference.named_parameters(), got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"step {step}: grad of {name}")
        for (name, g), w in zip(module.named_buffers(), reference.buffers()):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")


def test_batch_norm_of_a_transposed_tensor_trains_under_remat():
    torch.manual_seed(0)
    model = _TransposedBatchNorm()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8, 16)
    m = optimize(model, [Remat(budget=0.7, time_limit=5)], (x,))
    _assert_trains_like(m, reference, [x, torch.randn(4, 8, 16)])


def _recompute_batch_norms_in_the_backward(model: MemoryModel) -> dict:
    """The plain schedule, except that each training batch norm's output is dropped after its
    forward reads and recomputed just before its first read in the backward."""
    intervals = model.plain_intervals()
    position = {name: t for t, name in enumerate(model.order)}
    boundary = _forward_end(model)
    for unit in model.units:
        if not (is_training_batch_norm(unit.node) and unit.index == 0):
            continue
        reads = sorted(position[s] for s in model.graph.successors(unit.name))
        forward, backward = [t for t in reads if t < boundary], [t for t in reads if t >= boundary]
        assert forward and backward, unit.name
        intervals[unit.name] = [(position[unit.name], forward[-1]), (backward[0], backward[-1])]
    validate(model.graph, model.order, intervals, keep=model.keep)
    return intervals


def test_a_recomputed_batch_norm_of_a_transposed_tensor_has_its_traced_value_and_layout():
    torch.manual_seed(0)
    model = _TransposedBatchNorm(blocks=2)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8, 16)
    gm = capture(model, (x,), None, mode="train").graph_module
    step = ScheduledTraining(_recompute_batch_norms_in_the_backward)
    part = step.prepare(gm, (x,), {})
    recomputed = [n for n in part.joint.nodes if n.target is aten._native_batch_norm_legit.no_stats]
    assert len(recomputed) == 2
    for node in recomputed:
        # the op without statistics gives the output, mean and inverse std: so does its value
        out, mean, invstd = node.meta["val"]
        assert out.shape == (4, 16, 8) and mean.shape == invstd.shape == (16,)
    # the simulation counts what the recomputation allocates (three outputs, not five)
    assert max(liveness_profile(part.joint)) == max(part.model.profile(part.intervals))

    class Stepped(nn.Module):
        def __init__(self):
            super().__init__()
            self.gm = gm

        def forward(self, x):
            return step(gm, (x,), {})

    _assert_trains_like(Stepped(), reference, [x, torch.randn(4, 8, 16)])


def test_a_training_call_with_a_layout_other_than_the_traced_one_trains_like_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8, 16)
    m = optimize(model, [Remat(budget=1.0, time_limit=5)], (x,))  # traced with a contiguous batch
    transposed = torch.randn(4, 16, 8).transpose(1, 2)  # the same shape, another layout
    _assert_trains_like(m, reference, [transposed, x])
    assert len(m.meta[TRAINING_STEP].partitions) == 1  # put into the traced layout, not planned again
