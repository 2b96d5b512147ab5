"""Folding a per-feature scale and shift into the linear layers that read it: the readers
found through row-keeping views (GPT-2's Conv1D: a view, then addmm), the reasons a fold is
refused, and the folded layers computing on x what they computed on x * scale + shift."""

import pytest
import torch
import torch.nn as nn

from rewrite.capture import capture
from rewrite.folding import LINEAR, fold_input_affine, fold_problem, linear_readers, linear_weight
from rewrite.graph import get_attr_value

aten = torch.ops.aten


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight [in, out], x viewed to 2-D, then addmm."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out)), nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Affine(nn.Module):
    """y = x * scale + shift read by ``readers`` (linear, linear without bias, Conv1D, or others)."""

    def __init__(self, readers=("linear",)):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
        make = {"linear": lambda: nn.Linear(6, 3), "nobias": lambda: nn.Linear(6, 3, bias=False), "conv1d": lambda: Conv1D(6, 3)}
        self.names = list(readers)
        self.layers = nn.ModuleList(make.get(r, nn.Identity)() for r in readers)

    def forward(self, x):
        y = x * self.scale + self.shift
        return tuple(torch.relu(y) if name == "relu" else y if name == "out" else layer(y) for name, layer in zip(self.names, self.layers))


def _graph(*readers):
    gm = capture(Affine(readers), (torch.randn(2, 5, 6),)).graph_module
    (add,) = [n for n in gm.graph.nodes if n.target is aten.add.Tensor and n.args[0].target is aten.mul.Tensor]
    get_attrs = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    return gm, add, get_attrs["scale"], get_attrs["shift"]


def test_readers_through_row_keeping_views_are_found():
    gm, y, scale, shift = _graph("linear", "conv1d", "nobias")
    linears, problem = linear_readers(y)
    assert problem is None
    assert sorted(lin.root.target.__name__ for lin in linears) == ["addmm.default", "linear.default", "linear.default"]
    assert all(lin.root is LINEAR.match(lin.root).root for lin in linears)


@pytest.mark.parametrize("other, reason", [("relu", "not only by linear layers"), ("out", "an output of the model")])
def test_a_reader_that_is_not_linear_is_named(other, reason):
    gm, y, *_ = _graph("linear", other)
    linears, problem = linear_readers(y)
    assert linears == [] and reason in problem


@pytest.mark.parametrize("readers", [("linear",), ("nobias",), ("conv1d",), ("linear", "conv1d", "nobias")])
def test_folded_layers_compute_on_x_what_they_computed_on_the_affine(readers):
    torch.manual_seed(0)
    model = Affine(readers).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    gm = capture(model, (x,)).graph_module
    want = gm(x)
    (y,) = [n for n in gm.graph.nodes if n.target is aten.add.Tensor and n.args[0].target is aten.mul.Tensor]
    get_attrs = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    linears, problem = linear_readers(y)
    assert problem is None and fold_problem(gm, [6], get_attrs["scale"], get_attrs["shift"], linears) is None
    for linear in linears:
        assert fold_input_affine(gm, linear, model.scale, model.shift)
    y.replace_all_uses_with(y.args[0].args[0])  # the readers now read x itself
    gm.graph.eliminate_dead_code()
    gm.recompile()
    torch.testing.assert_close(gm(x), want)  # tuples of outputs
    weights = [get_attr_value(gm, linear_weight(lin)) for lin in linears]
    assert all(isinstance(w, nn.Parameter) and w.requires_grad for w in weights)


def test_fold_problems_are_named():
    gm, y, scale, shift = _graph("linear", "conv1d")
    linears, _ = linear_readers(y)
    assert "span 2 dimensions" in fold_problem(gm, [5, 6], scale, shift, linears)
    (linear,) = [lin for lin in linears if lin.root.target is aten.linear.default]
    get_attr_value(gm, linear_weight(linear)).requires_grad_(False)
    assert "weight is frozen" in fold_problem(gm, [6], scale, shift, linears)
    get_attr_value(gm, linear_weight(linear)).requires_grad_(True)
    get_attr_value(gm, linear["b"]).requires_grad_(False)
    assert "bias is frozen" in fold_problem(gm, [6], scale, shift, linears)
    assert fold_problem(gm, [6], scale, None, linears) is None  # a scale alone lands in the weights only

    gm, y, scale, shift = _graph("conv1d")
    addmm = linear_readers(y)[0]
    addmm[0].bindings.pop("b")  # as if the addmm had no bias to take the shift
    assert "no bias to take the shift" in fold_problem(gm, [6], scale, shift, addmm)


def test_a_tied_linear_weight_is_not_folded():
    gm, y, scale, shift = _graph("linear", "linear")
    linears, _ = linear_readers(y)
    assert len(linears) == 2 and fold_problem(gm, [6], scale, shift, linears) is None
    tied = capture(_Tied(), (torch.randn(2, 6),)).graph_module
    (y,) = [n for n in tied.graph.nodes if n.target is aten.add.Tensor and n.args[0].target is aten.mul.Tensor]
    get_attrs = {n.target: n for n in tied.graph.find_nodes(op="get_attr")}
    assert "shared (tied)" in fold_problem(tied, [6], get_attrs["scale"], get_attrs["shift"], linear_readers(y)[0])


class _Tied(Affine):
    def __init__(self):
        super().__init__(("linear", "linear"))
        self.layers[1].weight = self.layers[0].weight
