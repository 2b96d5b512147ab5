"""The numerics check cannot pass silently: gradients that are zero in both graphs are counted
and named; where the outputs' gradients do not reach the nodes a pass changed (a classifier
head initialised to zero) the values those nodes feed are projected into the loss too; and a
check that still tests nothing of the pass, or has no floating or differentiable output to
test, says so in the report's text, numbers and HTML instead of giving an error of 0."""

import pytest
import torch
import torch.nn as nn

from rewrite import optimize, zoo
from rewrite.html_report import render_html
from helpers import RebuildGelu

aten = torch.ops.aten


class ZeroHead(nn.Module):
    """Linear -> GELU -> a head initialised to zero: nothing upstream of the head gets a gradient."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def test_a_zero_initialised_head_does_not_hide_the_gradients_a_pass_changed():
    model, inputs = zoo.build("vit")
    nn.init.zeros_(model.head.weight)  # as torchvision's ViT does
    nn.init.zeros_(model.head.bias)
    report = optimize(model, ["approx_bp"], inputs).report
    p = report["approx_bp"]
    n = p.numerics
    assert n.grad_untested is None
    # the projection of the outputs alone gives zero gradients at the changed nodes ...
    assert n.changed_inputs and n.probes
    # ... so the values those nodes feed were projected too, and approx_bp's backward shows
    assert n.grad_rel_error > 1e-3 and n.grad_cosine < 0.9999
    at_changed = [e for e in n.grads if e.name.startswith("grad at ")]
    assert at_changed and not any(e.zero for e in at_changed)
    assert n.zero_grads == ["grad of norm.weight", "grad of norm.bias"]  # behind the zero head, fed by no changed node
    text = p.text()
    assert "projected into the loss too: " + ", ".join(n.probes[:3]) in text
    assert f"zero in both graphs: 2 of {len(n.grads)} gradients (grad of norm.weight, grad of norm.bias)" in text
    data = p.to_dict()["numerics"]
    assert data["probes"] == n.probes and data["grads_zero_in_both"] == n.zero_grads and data["grad_untested"] is None


def test_an_exact_pass_whose_changes_no_gradient_reaches_is_reported_untested():
    model = ZeroHead()
    report = optimize(model, [RebuildGelu()], (torch.randn(6, 8),)).report
    p = report["rebuild_gelu"]
    n = p.numerics
    assert n.changed_inputs == ["linear"] and n.probes == []  # the changed nodes feed only the output
    assert n.grad_untested == "every gradient at the inputs of the nodes the pass changed (linear) is zero in both graphs"
    assert n.grad_rel_error is None and n.grad_cosine is None
    assert {"grad of fc.weight", "grad of input 0", "grad at linear"} <= set(n.zero_grads)
    text = str(report)
    assert "pass rebuild_gelu: exact, gradients NOT TESTED" in text
    assert f"gradients: NOT TESTED for this pass: {n.grad_untested}" in text
    assert "within float rounding)" not in text.split("gradients:")[1]
    assert p.to_dict()["numerics"]["grad_untested"] == n.grad_untested
    page = render_html(report)
    assert "gradients not tested</span>" in page and ">tested nothing</div>" in page
    assert "(linear) is zero in both graphs" in page


class ArgmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x)).argmax(-1)


class FrozenEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8).requires_grad_(False)
        self.act = nn.GELU()

    def forward(self, ids):
        return self.act(self.embed(ids))


@pytest.mark.parametrize(
    "model,inputs,reason",
    [
        (ArgmaxNet, (torch.randn(6, 8),), "no output is floating point"),
        (FrozenEmbedding, (torch.randint(0, 10, (3, 5)),), "no output needs a gradient"),
    ],
)
def test_outputs_without_gradients_are_stated(model, inputs, reason):
    report = optimize(model(), [RebuildGelu()], inputs).report
    n = report["rebuild_gelu"].numerics
    assert n.grad_untested.startswith(reason) and n.grads == [] and n.grad_rel_error is None
    assert f"gradients: NOT TESTED for this pass: {reason}" in str(report)


def test_the_largest_gradient_error_is_named_where_the_joined_figure_hides_it():
    """A layer scale of 1e-6 (ConvNeXt): the gradients joined are almost exact, one behind the GELU is far off."""

    class LayerScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
            self.gamma = nn.Parameter(torch.full((16,), 1e-6))

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x))) * self.gamma

    torch.manual_seed(0)
    rewritten = optimize(LayerScaled(), ["approx_bp"], (torch.randn(8, 16),))
    (entry,) = rewritten.report.passes
    worst = entry.numerics.worst(entry.numerics.grads)
    assert entry.numerics.grad_rel_error < 1e-3 < worst.rel
    assert f"largest error: {worst.name}, relative error" in str(rewritten.report)
