"""The cost models (rewrite.cost_models): counted costs of an op by its FLOPs and bytes, and
measured ones timed on this machine."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from rewrite.liveness import MemoryModel
from rewrite.node_kinds import is_random
from helpers import node_of

aten = torch.ops.aten

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

    mm = node_of(costed_graph, aten.mm.default)
    relu = node_of(costed_graph, aten.relu.default)
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

    mm = node_of(costed_graph, aten.mm.default)
    relu = node_of(costed_graph, aten.relu.default)
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
    mm = node_of(gm, aten.mm.default)
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
