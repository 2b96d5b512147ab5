"""Activation memory, measured from what autograd saves: each storage once, for the node that
saved it first; parameters and buffers are not activations; grouped by module on request. And
the live-storage tracker's peak (measure_peak)."""

import pytest
import torch
import torch.nn as nn

from rewrite.capture import capture
from rewrite.memory import SavedActivations, flatten_inputs, measure_peak, record_saved, run_recording_saved

F32 = 4

MiB = 2**20


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("scale", torch.full((8,), 2.0))


def test_record_saved_counts_a_storage_saved_twice_once_and_excludes_parameters():
    module = Scaled()
    x = torch.randn(4, 8, requires_grad=True)
    with record_saved(module) as saved:
        h = torch.sin(x)  # saves x
        out = module.lin(h)  # saves h; the weight (a parameter) is not counted
        square = h * h  # saves h twice: already counted
        scaled = out * module.scale  # saves the buffer (not counted); out is not needed
    assert isinstance(saved, SavedActivations)
    assert saved.total_bytes == 2 * 4 * 8 * F32
    assert saved.by_source == {"?": saved.total_bytes}
    (square.sum() + scaled.sum()).backward()  # the recorded tensors are still usable
    assert x.grad is not None


def test_record_saved_counts_a_view_by_its_storage():
    x = torch.randn(6, 10, requires_grad=True)
    with record_saved(nn.Module()) as saved:
        base = x * 1.0  # saves nothing (a constant scale)
        first = torch.exp(base[:3])  # saves its output, a fresh storage
        second = torch.sin(base[3:])  # saves a view of base: base's whole storage
        third = torch.cos(base[:2])  # another view of base: already counted
    assert saved.total_bytes == (3 * 10 + 6 * 10) * F32
    assert first.requires_grad and second.requires_grad and third.requires_grad


def test_record_saved_records_nothing_without_autograd():
    module = Scaled()
    with torch.no_grad(), record_saved(module) as saved:
        module.lin(torch.randn(3, 8)).sin()
    assert saved.total_bytes == 0 and saved.by_source == {}
    with record_saved(module) as saved:
        torch.randn(3, 8).sin()  # nothing requires grad: nothing is saved
    assert saved.total_bytes == 0


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        h = self.lin(x)  # saves x (for the weight's gradient)
        g = torch.sin(h)  # saves h
        m = h * g  # saves h (again) and g
        return torch.tanh(m)  # saves its output


@pytest.fixture(scope="module")
def chain_capture():
    torch.manual_seed(0)
    model = Chain()
    return model, capture(model, (torch.randn(3, 8),))


@pytest.mark.parametrize("batch", [3, 5])
def test_run_recording_saved_attributes_bytes_to_the_node_that_saved_first(chain_capture, batch):
    model, captured = chain_capture
    x = torch.randn(batch, 8)
    out, saved, _ = run_recording_saved(captured.graph_module, (x,), {})
    torch.testing.assert_close(out, model(x))
    row = batch * 16 * F32
    assert saved.by_source == {"linear": batch * 8 * F32, "sin": row, "mul": row, "tanh": row}
    assert saved.total_bytes == sum(saved.by_source.values())
    out.sum().backward()
    assert model.lin.weight.grad is not None


def test_run_recording_saved_with_keyword_inputs():
    class WithMask(nn.Module):
        def forward(self, x, mask=None):
            return torch.exp(x) * mask

    captured = capture(WithMask(), (torch.randn(3, 4, requires_grad=True),), {"mask": torch.rand(3, 4)})
    x = torch.randn(2, 4, requires_grad=True)
    mask = torch.rand(2, 4)
    assert len(flatten_inputs(captured.graph_module, (x,), {"mask": mask})) == 2
    out, saved, _ = run_recording_saved(captured.graph_module, (x,), {"mask": mask})
    torch.testing.assert_close(out, torch.exp(x) * mask)
    # exp saves its output; mul saves the mask (for exp's gradient) and exp's output (already counted)
    assert saved.by_source == {"exp": 2 * 4 * F32, "mul": 2 * 4 * F32}


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return torch.sin(self.b(self.a(x)))


def test_by_module_groups_bytes_by_module_path_in_graph_order():
    captured = capture(Grouped(), (torch.randn(3, 8),))
    gm = captured.graph_module
    _, saved, _ = run_recording_saved(gm, (torch.randn(5, 8),), {})
    grouped = saved.by_module(gm.graph)
    # b saves tanh's output, which tanh already saved: b gets nothing
    assert grouped == {"a.0": 5 * 8 * F32, "a.1": 5 * 16 * F32, "(top)": 5 * 4 * F32}
    assert list(grouped) == ["a.0", "a.1", "(top)"]
    assert sum(grouped.values()) == saved.total_bytes


def test_by_module_sums_several_nodes_of_one_module():
    class TwoOps(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    class Inner(nn.Module):
        def forward(self, x):
            return torch.exp(x) * 2 + torch.sin(x)  # exp saves its output, sin its input

    captured = capture(TwoOps(), (torch.randn(3, 4, requires_grad=True),))
    gm = captured.graph_module
    _, saved, _ = run_recording_saved(gm, (torch.randn(3, 4, requires_grad=True),), {})
    assert saved.by_source == {"exp": 3 * 4 * F32, "sin": 3 * 4 * F32}
    assert saved.by_module(gm.graph) == {"inner": saved.total_bytes}
    assert SavedActivations().by_module(gm.graph) == {}


def test_run_recording_saved_on_a_traced_graph_without_an_input_spec():
    model = Chain()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 8)
    out, saved, _ = run_recording_saved(gm, (x,), {})
    torch.testing.assert_close(out, model(x))
    # the linear is one call_module node here, named after the module
    assert saved.by_source == {"lin": 2 * 8 * F32, "sin": 2 * 16 * F32, "mul": 2 * 16 * F32, "tanh": 2 * 16 * F32}
    assert flatten_inputs(gm, (x,), {}) == [x]


def test_copies_of_the_weights_are_not_activations():
    # Under autocast a linear layer saves a bf16 copy of its weight: computed from a parameter
    # alone, it is no activation; the bf16 copy of the input is.
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), record_saved(layer) as saved:
        layer(x)
    assert saved.total_bytes == x.numel() * 2


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
