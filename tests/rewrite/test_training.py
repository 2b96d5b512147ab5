"""The shared training loop: a student reaches its teacher, runs repeat under a seed, stop
early when asked, read batches as users have them, and a pass that needs data says so before
anything is captured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import rewrite
from rewrite import Change, Match, Pass, PassResult, add_parameter, optimize, replace_by_example
from rewrite.capture import capture
from rewrite.errors import OptionError
from rewrite.html_report import render_html
from rewrite.module import clone_graph_module
from rewrite.training import activations, distill, split_batch
from helpers import ApproximatePass


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher, student = nn.Linear(8, 4), nn.Linear(8, 4)
    return teacher, student


def _data(with_labels: bool = True, n: int = 256):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(4))
    dataset = TensorDataset(x, labels) if with_labels else TensorDataset(x)
    return DataLoader(dataset, batch_size=32, shuffle=False)


@pytest.mark.parametrize("with_labels", [True, False], ids=["pairs", "bare inputs"])
def test_a_student_reaches_its_teacher(with_labels):
    teacher, student = _pair()
    before = student.weight.detach().clone()
    result = distill(student, teacher, _data(with_labels), trainable=list(student.parameters()), steps=300, lr=0.05,
                     progress=False)
    assert result.steps == 300 and len(result.losses) == 300
    assert result.losses[-1] < result.losses[0] / 100
    assert torch.allclose(student.weight, teacher.weight, atol=1e-2) and not torch.equal(student.weight, before)


def test_runs_repeat_under_a_seed_and_leave_the_random_state_alone():
    runs = []
    for _ in range(2):
        teacher, student = _pair()
        dropout = nn.Sequential(student, nn.Dropout(0.3))  # draws from the random state every step
        state = torch.random.get_rng_state()
        runs.append(distill(dropout, teacher, _data(), trainable=list(student.parameters()), steps=20, seed=7,
                            progress=False).losses)
        assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0] == runs[1]


def test_early_stop_by_tolerance_and_by_patience():
    teacher, student = _pair()
    student.load_state_dict(teacher.state_dict())
    result = distill(student, teacher, _data(), trainable=list(student.parameters()), steps=50, tolerance=1e-12,
                     progress=False)
    assert result.steps == 1 and "tolerance" in result.stopped_early
    teacher, student = _pair()
    result = distill(student, teacher, _data(), trainable=list(student.parameters()), steps=500, lr=1e-9, patience=3,
                     progress=False)
    assert result.steps < 500 and "for 3 steps" in result.stopped_early


def test_the_progress_bar_goes_to_stderr_and_is_silent_when_asked(capsys):
    teacher, student = _pair()
    distill(student, teacher, _data(), trainable=list(student.parameters()), steps=5, progress=True,
            description="toy")
    out, err = capsys.readouterr()
    assert out == "" and "toy" in err
    distill(student, teacher, _data(), trainable=list(student.parameters()), steps=5, progress=False)
    assert capsys.readouterr() == ("", "")


def test_per_layer_targets_from_the_graphs_intermediate_values():
    """The student matches the teacher's hidden layer, read from both captured graphs."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4, 8)
    t_graph, s_graph = capture(teacher, (x,)).graph_module, capture(student, (x,)).graph_module
    hidden = next(n.name for n in t_graph.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    result = distill(
        lambda x: activations(s_graph, [hidden], (x,))[hidden],
        lambda x: activations(t_graph, [hidden], (x,))[hidden],
        _data(), trainable=list(s_graph.parameters()), steps=200, lr=0.02, progress=False,
    )
    assert result.losses[-1] < result.losses[0] / 10
    with pytest.raises(OptionError, match="no node named nowhere"):
        activations(s_graph, ["nowhere"], (x,))


@pytest.mark.parametrize(
    "batch,expected_inputs,has_target",
    [(torch.ones(2, 3), 1, False), ((torch.ones(2, 3),), 1, False), ([torch.ones(2, 3), torch.zeros(2)], 1, True)],
)
def test_batches_as_users_have_them(batch, expected_inputs, has_target):
    inputs, target = split_batch(batch, 1)
    assert len(inputs) == expected_inputs and (target is not None) == has_target


@pytest.mark.parametrize("batch", [{"x": torch.ones(2)}, (torch.ones(2), torch.ones(2), torch.ones(2))])
def test_batches_that_do_not_fit_the_model_are_option_errors(batch):
    with pytest.raises(OptionError, match="batch"):
        split_batch(batch, 1)


@dataclass(frozen=True)
class NeedsData(Pass):
    """A pass that learns (for this test: it only reads a batch)."""

    name: ClassVar[str] = "needs_data"
    needs_data: ClassVar[bool] = True

    def run(self, gm, ctx):
        first = next(iter(ctx.data))
        return PassResult(figures={"batch_rows": len(first[0]), "draw": torch.rand(1, generator=ctx.generator()).item()})


class RaisesIfCaptured(nn.Module):
    def forward(self, x):
        raise AssertionError("captured before the missing data was noticed")


def test_a_pass_that_needs_data_and_gets_none_fails_before_capture():
    with pytest.raises(OptionError, match="needs_data.*learns from data.*data="):
        optimize(RaisesIfCaptured(), [NeedsData()], (torch.randn(2, 8),))


def test_a_pass_gets_the_data_and_a_seeded_generator():
    model = nn.Linear(8, 4)
    reports = [optimize(model, [NeedsData()], (torch.randn(4, 8),), data=_data(), seed=s).report for s in (1, 1, 2)]
    figures = [r["needs_data"].figures for r in reports]
    assert figures[0]["batch_rows"] == 32 and figures[0]["draw"] == figures[1]["draw"] != figures[2]["draw"]
    with pytest.raises(OptionError, match="re-iterable"):
        optimize(model, [NeedsData()], (torch.randn(4, 8),), data=iter(_data()))


@dataclass(frozen=True)
class LearnedScale(ApproximatePass):
    """A pass that trains (for this test): after every GELU, a per-feature scale it adds as a
    parameter, initialised off 1 and distilled back towards the original's outputs."""

    name: ClassVar[str] = "learned_scale"
    needs_data: ClassVar[bool] = True

    def run(self, gm, ctx):
        teacher = clone_graph_module(gm)  # shares the weights: only the new scale trains
        linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.args[0].target
                      is torch.ops.aten.gelu.default)
        hidden, weight, bias = linear.args
        scale = nn.Parameter(1 + 0.5 * torch.rand(hidden.meta["val"].shape[-1], generator=ctx.generator()))
        scale_node = add_parameter(gm, "scale", scale, like=linear)
        new = replace_by_example(Match(root=linear, bindings={}, nodes=[linear]),
                                 lambda h, s, w, b: torch.nn.functional.linear(h * s, w, b), hidden, scale_node, weight, bias)
        linear.replace_all_uses_with(new)
        gm.graph.erase_node(linear)
        gm.recompile()
        result = distill(gm, teacher, ctx.data, trainable=[scale], steps=60, lr=0.05, seed=ctx.seed, progress=False)
        return PassResult(changes=[Change(linear.name, "", "aten.linear", "aten.linear of a scaled input")],
                          series={"loss": result.losses})


def test_a_pass_that_trains_leaves_the_users_model_bit_equal_and_its_new_parameter_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rewritten = optimize(model, [LearnedScale()], (torch.randn(4, 8),), data=_data(with_labels=False))

    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items()), "the user's model changed"
    losses = rewritten.report["learned_scale"].result.series["loss"]
    assert losses[-1] < losses[0] / 10, "the pass did not train"
    page = render_html(rewritten.report)
    assert "Training loss" in page and 'aria-label="training loss"' in page and f"{losses[-1]:.4g}" in page
    scale = dict(rewritten.named_parameters())["scale"]
    assert scale.requires_grad and "scale" in rewritten.state_dict()
    rewritten(torch.randn(4, 8)).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0

    loaded = rewrite.load(rewrite.save(rewritten, tmp_path / "scaled.pt2"))
    assert torch.equal(dict(loaded.named_parameters())["scale"], scale.detach())
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), rewritten(x))
