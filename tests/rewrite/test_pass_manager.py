"""PassManager and verification: passes run on copies, the failing pass is named, an exact pass
is held to float rounding in outputs and gradients, an approximate one gets its error
measured, and checking leaves buffers and the random state as they were."""

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from rewrite import OptionError, Pass, PassContext, PassError, PassManager, PassResult, optimize, option
from rewrite.capture import capture
from rewrite.graph import call_function
from rewrite.module import clone_graph_module
from rewrite.verify import _error, compare, tolerance
from helpers import ApproximatePass, RebuildGelu

aten = torch.ops.aten


# -- passes written the way a user would -----------------------------------------------------


@dataclass(frozen=True)
class NoOp(Pass):
    name: ClassVar[str] = "no_op"

    def run(self, gm, ctx):
        return PassResult()


@dataclass(frozen=True)
class Boom(Pass):
    name: ClassVar[str] = "boom"

    def run(self, gm, ctx):
        raise RuntimeError("something broke inside")


@dataclass(frozen=True)
class RefusesInCheck(Pass):
    name: ClassVar[str] = "refuses"

    def check(self, gm, ctx):
        raise self.fail("needs a GPU; run it on one")

    def run(self, gm, ctx):
        raise AssertionError("run must not be reached")


@dataclass(frozen=True)
class RaisesOptionError(Pass):
    name: ClassVar[str] = "raises_option_error"

    def run(self, gm, ctx):
        raise OptionError("budget must be positive")


@dataclass(frozen=True)
class GeluToRelu(Pass):
    """Replaces GELU by ReLU; claims to be exact unless told otherwise."""

    name: ClassVar[str] = "gelu_to_relu"
    approximate: bool = option(False, "declare the pass approximate")

    @property
    def exact_forward(self):
        return not self.approximate

    @property
    def exact_backward(self):
        return not self.approximate

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.target is aten.gelu.default:
                node.target = aten.relu.default
        return PassResult()


@dataclass(frozen=True)
class DetachBeforeGelu(Pass):
    """Same outputs; no gradient reaches what comes before each GELU."""

    name: ClassVar[str] = "detach_before_gelu"
    exact_gradients: bool = option(False, "claim exact gradients")

    @property
    def exact_backward(self):
        return self.exact_gradients

    def run(self, gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is aten.gelu.default:
                x = node.args[0]
                with gm.graph.inserting_before(node):
                    detached = call_function(gm.graph, aten.detach.default, (x,), like=node)
                node.replace_input_with(x, detached)
        return PassResult()


@dataclass(frozen=True)
class UseBeforeDefinition(Pass):
    name: ClassVar[str] = "use_before_definition"

    def run(self, gm, ctx):
        last = gm.graph.output_node().args[0][0]
        first_call = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(first_call):
            gm.graph.call_function(aten.relu.default, (last,))
        return PassResult()


@dataclass(frozen=True)
class FailsAtRunTime(Pass):
    name: ClassVar[str] = "fails_at_run_time"

    def run(self, gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is aten.gelu.default:
                with gm.graph.inserting_before(node):
                    bad = gm.graph.call_function(aten.mm.default, (node.args[0], node.args[0]))
                bad.meta["val"] = node.meta["val"]  # metadata that lies: only running it shows the problem
                node.replace_all_uses_with(bad)
                gm.graph.erase_node(node)
        return PassResult()


@dataclass(frozen=True)
class NoMetadata(Pass):
    name: ClassVar[str] = "no_metadata"

    def run(self, gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is aten.gelu.default:
                with gm.graph.inserting_before(node):
                    relu = gm.graph.call_function(aten.relu.default, (node.args[0],))
                node.replace_all_uses_with(relu)
                gm.graph.erase_node(node)
        return PassResult()


@dataclass(frozen=True)
class DoubleFirstWeight(ApproximatePass):
    """Replaces fc1's weight by a doubled copy (approximate, obviously)."""

    name: ClassVar[str] = "double_first_weight"

    def run(self, gm, ctx):
        gm.fc1.weight = nn.Parameter(gm.fc1.weight.detach() * 2)
        return PassResult(figures={"doubled": 1})


# -- a model with every kind of state --------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.bn(self.drop(self.act(self.fc1(x)))))


@pytest.fixture(scope="module")
def train_capture():
    torch.manual_seed(0)
    model = Net().train()
    return model, capture(model, (torch.randn(6, 8),), mode="train")


def _run(passes, captured, **kwargs):
    ctx = PassContext(captured.example_args, captured.example_kwargs, captured.mode)
    return PassManager(passes, **kwargs).run(captured.graph_module, ctx)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module, snapshot):
    state = module.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


# -- errors name the pass ------------------------------------------------------------------


def test_an_exception_in_a_pass_is_a_pass_error_naming_it(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError) as info:
        _run([NoOp(), Boom(), NoOp()], captured)
    assert info.value.pass_name == "boom"
    assert str(info.value).startswith("pass 'boom': ")
    assert "RuntimeError: something broke inside" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_errors_the_pass_raises_itself_pass_through(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError) as info:
        _run([RefusesInCheck()], captured)
    assert str(info.value) == "pass 'refuses': needs a GPU; run it on one"
    with pytest.raises(OptionError, match="^budget must be positive$"):
        _run([RaisesOptionError()], captured)


def test_an_exact_pass_that_changes_the_outputs_is_refused(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError) as info:
        _run([NoOp(), GeluToRelu()], captured)
    message = str(info.value)
    assert info.value.pass_name == "gelu_to_relu"
    assert message.startswith("pass 'gelu_to_relu': changed the outputs beyond float rounding")
    assert "output 0: relative error" in message


def test_an_approximate_pass_may_change_outputs_and_gets_its_error_measured(train_capture):
    _, captured = train_capture
    _, (report,) = _run([GeluToRelu(approximate=True)], captured)
    assert report.numerics.output_rel_error > 1e-3
    assert not report.numerics.forward_within_rounding
    assert report.kind() == "approximate"
    assert report.spec == "gelu_to_relu{approximate=true}"


def test_a_pass_declaring_inexact_gradients_may_change_them(train_capture):
    _, captured = train_capture
    _, (report,) = _run([DetachBeforeGelu()], captured)
    numerics = report.numerics
    assert numerics.forward_within_rounding and numerics.output_rel_error <= tolerance(torch.float32)
    assert not numerics.backward_within_rounding
    assert numerics.grad_rel_error is not None and numerics.grad_rel_error > 0.05
    assert numerics.grad_cosine < 0.999
    bad = {e.name for e in numerics.grads if not e.within_rounding}
    assert "grad of fc1.weight" in bad and "grad of input 0" in bad
    assert "grad of fc2.weight" not in bad  # after the GELU nothing changed
    assert report.kind() == "exact forward, approximate backward"
    assert report.to_dict()["numerics"]["grad_rel_error"] == pytest.approx(numerics.grad_rel_error)


def test_a_pass_claiming_exact_gradients_that_changes_them_is_refused(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError, match="pass 'detach_before_gelu': changed the gradients beyond float rounding") as info:
        _run([DetachBeforeGelu(exact_gradients=True)], captured)
    assert "grad of" in str(info.value)


def test_a_broken_graph_is_refused(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError, match="pass 'use_before_definition': left a broken graph"):
        _run([UseBeforeDefinition()], captured)


def test_nodes_without_metadata_are_refused(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError, match=r"pass 'no_metadata': left nodes without metadata \(meta\['val'\]\): relu"):
        _run([NoMetadata()], captured, verify=False)


def test_a_graph_that_fails_on_the_example_inputs_is_refused(train_capture):
    _, captured = train_capture
    with pytest.raises(PassError, match="pass 'fails_at_run_time': the rewritten graph fails on the example inputs"):
        _run([FailsAtRunTime()], captured)
    _, (report,) = _run([FailsAtRunTime()], captured, verify=False)  # not checked: not caught
    assert report.numerics is None


# -- copies, snapshots ---------------------------------------------------------------------


def test_the_graph_module_handed_in_is_not_modified(train_capture):
    model, captured = train_capture
    gm = captured.graph_module
    code = gm.code
    nodes = [(n.name, n.target, n.args) for n in gm.graph.nodes]
    params = dict(gm.named_parameters())
    final, reports = _run([RebuildGelu(), GeluToRelu(approximate=True), DoubleFirstWeight()], captured)
    assert gm.code == code
    assert [(n.name, n.target, n.args) for n in gm.graph.nodes] == nodes
    assert dict(gm.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in gm.named_parameters())
    assert gm.fc1.weight is model.fc1.weight
    assert final.fc1.weight is not gm.fc1.weight
    torch.testing.assert_close(final.fc1.weight, 2 * gm.fc1.weight)
    assert final.fc2.weight is gm.fc2.weight  # untouched parameters are shared, not copied
    assert final.code != code


def test_each_report_keeps_the_graphs_before_and_after(train_capture):
    _, captured = train_capture
    final, reports = _run([RebuildGelu(), GeluToRelu(approximate=True)], captured)
    first, second = reports
    assert [r.name for r in reports] == ["rebuild_gelu", "gelu_to_relu"]
    assert first.before is captured.graph_module
    assert second.before is first.after
    assert second.after is final
    targets = lambda gm: {n.target for n in gm.graph.nodes}  # noqa: E731
    assert aten.gelu.default in targets(first.before) and aten.gelu.default in targets(first.after)
    assert aten.relu.default not in targets(second.before)
    assert aten.relu.default in targets(second.after) and aten.gelu.default not in targets(second.after)
    assert len(first.changes) == 1 and first.skipped == []
    assert first.seconds > 0 and first.exact_forward and first.exact_backward


def test_progress_names_each_pass(train_capture):
    _, captured = train_capture
    messages = []
    _run([NoOp(), GeluToRelu(approximate=True)], captured, progress=messages.append)
    assert messages[0] == "pass 1/2: no_op"
    assert any(m.startswith("pass 1/2: no_op: 0 changed, 0 left alone") for m in messages)
    assert "checking gelu_to_relu on the example inputs" in messages
    assert any(m.startswith("pass 2/2: gelu_to_relu{approximate=true}") for m in messages)


def test_no_passes_returns_the_graph_unchanged(train_capture):
    _, captured = train_capture
    final, reports = _run([], captured)
    assert final is captured.graph_module and reports == []


# -- what verification leaves behind -------------------------------------------------------


def test_verification_does_not_change_buffers_or_the_random_state(train_capture):
    model, captured = train_capture
    snapshot = _snapshot(model)
    rng = torch.get_rng_state()
    _, (report,) = _run([RebuildGelu()], captured)
    assert report.numerics is not None  # the graph was run in train mode, twice
    _assert_same_state(model, snapshot)
    assert torch.equal(torch.get_rng_state(), rng)


def test_optimize_in_train_mode_leaves_batch_norm_statistics_alone():
    torch.manual_seed(1)
    model = Net().train()
    with torch.no_grad():  # give the statistics values a run would visibly change
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(7)
    snapshot = _snapshot(model)
    x = torch.randn(6, 8)
    result = optimize(model, [RebuildGelu()], (x,), mode="train")
    assert result.report["rebuild_gelu"].numerics is not None
    _assert_same_state(model, snapshot)
    assert model.bn.num_batches_tracked.item() == 7
    result(x)  # the result itself does update them, sharing the user's buffers
    assert model.bn.num_batches_tracked.item() == 8
    assert not torch.equal(model.bn.running_mean, snapshot["bn.running_mean"])


def test_random_ops_are_compared_under_the_same_seed(train_capture):
    model, captured = train_capture
    assert any(n.target is aten.dropout.default and n.args[2] is True for n in captured.graph_module.graph.nodes)
    for exact_pass in (NoOp(), RebuildGelu()):
        _, (report,) = _run([exact_pass], captured)
        assert report.numerics.output_rel_error == 0.0
        assert report.numerics.grad_rel_error == 0.0


def test_verify_false_skips_the_numerics(train_capture):
    _, captured = train_capture
    final, (report,) = _run([GeluToRelu()], captured, verify=False)  # would be refused if checked
    assert report.numerics is None
    assert report.activation_bytes is None
    assert "numerics" not in report.to_dict()
    assert any(n.target is aten.relu.default for n in final.graph.nodes)


def test_the_numerics_record_saved_activations(train_capture):
    _, captured = train_capture
    _, (report,) = _run([NoOp()], captured)
    before, after = report.activation_bytes
    assert before == after > 0


# -- verify.compare ------------------------------------------------------------------------


def test_compare_of_a_graph_with_itself_is_exact(train_capture):
    _, captured = train_capture
    gm = captured.graph_module
    numerics = compare(gm, clone_graph_module(gm), captured.example_args, captured.example_kwargs)
    assert [e.name for e in numerics.outputs] == ["output 0"]
    assert numerics.output_rel_error == 0.0 and numerics.grad_rel_error == 0.0
    assert numerics.grad_cosine == pytest.approx(1.0)
    names = [e.name for e in numerics.grads]
    assert names[0] == "grad of input 0"
    assert {f"grad of {n}" for n, _ in gm.named_parameters()} == set(names[1:])


def test_compare_leaves_out_parameters_a_pass_replaced(train_capture):
    _, captured = train_capture
    gm = captured.graph_module
    replaced = clone_graph_module(gm)
    replaced.fc1.weight = nn.Parameter(gm.fc1.weight.detach().clone())
    numerics = compare(gm, replaced, captured.example_args, captured.example_kwargs)
    names = {e.name for e in numerics.grads}
    assert "grad of fc1.weight" not in names and "grad of fc1.bias" in names
    assert numerics.forward_within_rounding and numerics.backward_within_rounding


def test_tensor_errors():
    a = torch.tensor([1.0, 2.0, float("nan")])
    assert _error("t", a, a.clone()).rel == 0.0
    assert _error("t", a, torch.tensor([1.0, float("nan"), 2.0])).rel == math.inf  # NaN moved
    assert _error("t", torch.ones(2), torch.ones(3)).rel == math.inf
    assert _error("t", torch.tensor([1, 2]), torch.tensor([1, 2])).rel == 0.0
    assert _error("t", torch.tensor([1, 3]), torch.tensor([1, 2])).rel == math.inf
    assert _error("t", torch.zeros(2), torch.zeros(2)).rel == 0.0
    assert _error("t", torch.ones(2), torch.zeros(2)).rel == math.inf
    err = _error("t", torch.tensor([3.0, 4.0]) * 1.001, torch.tensor([3.0, 4.0]))
    assert err.rel == pytest.approx(1e-3, rel=1e-3) and err.max_abs == pytest.approx(4e-3, rel=1e-3)
    assert not err.within_rounding
    assert _error("t", torch.tensor([3.0, 4.0]) * (1 + 1e-6), torch.tensor([3.0, 4.0])).within_rounding
    assert tolerance(torch.float16) > tolerance(torch.float32) > tolerance(torch.float64) > 0
    assert tolerance(torch.int64) == 0.0


@dataclass(frozen=True)
class PlansTheFinalGraph(Pass):
    """Declares that it must run last."""

    name: ClassVar[str] = "plans_final"
    runs_last: ClassVar[str] = "it plans the graph it is given"

    def run(self, gm, ctx):
        return PassResult()


def test_ordering_rules_are_checked_before_anything_runs():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("captured before the order was checked")

    with pytest.raises(OptionError, match="pass 'plans_final' must run last: it plans the graph it is given; move rebuild_gelu before it"):
        optimize(Boom(), [PlansTheFinalGraph(), RebuildGelu()], (torch.randn(2, 4),))
    with pytest.raises(OptionError, match="must run last"):
        PassManager([PlansTheFinalGraph(), NoOp()])
    PassManager([NoOp(), PlansTheFinalGraph()])  # last: allowed


def _eval_batches(labelled: bool):
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(6))
    return DataLoader(TensorDataset(x, labels) if labelled else TensorDataset(x), batch_size=16)


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no labels"])
def test_an_approximate_pass_is_measured_on_eval_data(labelled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    figures = optimize(model, [GeluToRelu(approximate=True)], (torch.randn(4, 8),), eval_data=_eval_batches(labelled)).report[
        "gelu_to_relu"
    ].figures
    assert 0 < figures["eval_agreement"] <= 1 and 0 < figures["eval_output_rel_error"] < 1
    if labelled:
        with torch.no_grad():
            x, y = _eval_batches(True).dataset.tensors
            expected = (model(x).argmax(-1) == y).float().mean().item()
        assert figures["eval_accuracy_before"] == pytest.approx(expected)
        assert 0 <= figures["eval_accuracy_after"] <= 1
    else:
        assert "eval_accuracy_before" not in figures
    exact = optimize(model, [RebuildGelu()], (torch.randn(4, 8),), eval_data=_eval_batches(labelled)).report["rebuild_gelu"]
    assert not any(key.startswith("eval_") for key in exact.figures)
