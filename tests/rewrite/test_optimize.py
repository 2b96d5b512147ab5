"""optimize and the module it returns: a drop-in replacement that is called like the model,
shares its parameters (except those a pass replaced), trains, switches train/eval, carries
before/after/report, and leaves the user's model as it was, also when a pass fails."""

import copy
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from helpers import randomize_norms

import passes
import rewrite
from rewrite import Pass, PassError, PassResult, RewrittenModule, optimize, zoo

aten = torch.ops.aten


class Net(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> BatchNorm -> Linear, optional keyword scale."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x, scale=None):
        out = self.fc2(self.bn(self.drop(self.act(self.fc1(self.norm(x))))))
        return out if scale is None else out * scale


def _net(seed=0):
    torch.manual_seed(seed)
    model = randomize_norms(Net(), seed)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _inputs(batch=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=gen), torch.randn(batch, 4, generator=gen)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


def _flags(model):
    return {name: m.training for name, m in model.named_modules()}


def _mode_flags(gm) -> dict[str, list[bool]]:
    flags = {"dropout": [], "batch_norm": []}
    for node in gm.graph.nodes:
        if node.target is aten.dropout.default:
            flags["dropout"].append(node.args[2])
        elif node.target is aten.batch_norm.default:
            flags["batch_norm"].append(node.args[5])
    return flags


@pytest.fixture(scope="module")
def rewritten():
    """Net rewritten by approx_bp in train mode, with keyword input `scale`."""
    model = _net()
    x, scale = _inputs()
    model.train()
    return model, optimize(model, ["approx_bp"], (x,), {"scale": scale}, mode="train")


# -- called like the original --------------------------------------------------------------


def test_the_result_is_called_like_the_original(rewritten):
    model, m = rewritten
    assert isinstance(m, RewrittenModule) and isinstance(m, nn.Module)
    m.eval()
    model.eval()
    try:
        for batch in (6, 3):  # the batch was captured as dynamic
            x, scale = _inputs(batch, seed=batch)
            expected = model(x, scale=scale)
            torch.testing.assert_close(m(x, scale=scale), expected)
            torch.testing.assert_close(m(x, scale), expected)  # positionally too
    finally:
        m.train()
        model.train()


def test_positional_inputs():
    model = _net().eval()
    x, scale = _inputs()
    m = optimize(model, ["approx_bp{norms=false}"], (x, scale))
    torch.testing.assert_close(m(x, scale), model(x, scale))
    torch.testing.assert_close(m(x, scale=scale), model(x, scale=scale))
    x7, scale7 = _inputs(7, seed=7)
    torch.testing.assert_close(m(x7, scale7), model(x7, scale7))


def test_parameters_are_shared_except_those_a_pass_replaced(rewritten):
    model, m = rewritten
    original = dict(model.named_parameters())
    result = dict(m.named_parameters())
    # approx_bp folded the LayerNorm into fc1: the norm's parameters are gone, fc1's are new
    assert set(original) - set(result) == {"norm.weight", "norm.bias"}
    replaced = {n for n, p in result.items() if p is not original.get(n)}
    assert replaced == {"fc1.weight", "fc1.bias"}
    assert all(result[n] is original[n] for n in ("fc2.weight", "fc2.bias", "bn.weight", "bn.bias"))
    assert m.bn.running_mean is model.bn.running_mean
    assert all(p.requires_grad for p in result.values())
    assert not torch.equal(result["fc1.weight"], original["fc1.weight"])  # folded, not copied


def test_an_optimizer_step_trains_every_parameter():
    model = _net().train()
    x, scale = _inputs()
    m = optimize(model, ["approx_bp"], (x,), {"scale": scale})
    params = dict(m.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    user_fc2 = model.fc2.weight.detach().clone()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    optimizer.zero_grad()
    m(x, scale=scale).pow(2).mean().backward()
    for name, p in params.items():
        assert p.grad is not None, f"no gradient reached {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    optimizer.step()
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    assert not torch.equal(model.fc2.weight.detach(), user_fc2)  # shared with the user's model


def test_before_after_and_report(rewritten):
    model, m = rewritten
    assert isinstance(m.before, fx.GraphModule) and isinstance(m.after, fx.GraphModule)
    assert m.after is m
    before_targets = {n.target for n in m.before.graph.nodes}
    after_targets = {n.target for n in m.graph.nodes}
    assert aten.gelu.default in before_targets and aten.layer_norm.default in before_targets
    assert aten.gelu.default not in after_targets and aten.layer_norm.default not in after_targets
    assert torch.ops.rewrite.regelu2.default in after_targets
    report = m.report
    assert isinstance(report, rewrite.Report)
    assert len(report) == 1 and [p.name for p in report] == ["approx_bp"]
    assert report.model == "Net" and report.mode == "train"
    assert sorted(report.dynamic_inputs) == ["scale", "x"]
    entry = report["approx_bp"]
    assert {c.before for c in entry.changes} == {"aten.gelu", "aten.layer_norm"}
    assert entry.seconds > 0 and entry.numerics is not None
    assert entry.before is not None and entry.after is not None
    assert "approx_bp" in str(report)
    args, kwargs = m.example_inputs
    assert args[0].shape == (6, 16) and set(kwargs) == {"scale"}
    with pytest.raises(KeyError, match="approx_bp"):
        report["remat"]


def test_the_users_model_is_not_modified_by_a_successful_rewrite():
    model = _net().train()
    model.drop.eval()
    flags, snapshot = _flags(model), _snapshot(model)
    params = dict(model.named_parameters())
    x, scale = _inputs()
    optimize(model, ["approx_bp"], (x,), {"scale": scale}, mode="eval")
    assert _flags(model) == flags
    _assert_state(model, snapshot)
    assert dict(model.named_parameters()) == params
    assert all(p is params[n] for n, p in model.named_parameters())


# -- train / eval --------------------------------------------------------------------------


def test_eval_and_train_switch_dropout_and_batch_norm():
    model = _net().train()
    x, scale = _inputs()
    m = optimize(model, ["approx_bp"], (x,), {"scale": scale}, mode="train")
    assert m.training
    assert _mode_flags(m) == {"dropout": [True], "batch_norm": [True]}

    assert m.eval() is m and not m.training
    assert _mode_flags(m) == {"dropout": [False], "batch_norm": [False]}
    first, second = m(x, scale=scale), m(x, scale=scale)
    assert torch.equal(first, second)  # no dropout, running statistics
    model.eval()
    torch.testing.assert_close(first, model(x, scale=scale))

    m.train()
    model.train()
    assert m.training and _mode_flags(m) == {"dropout": [True], "batch_norm": [True]}
    torch.manual_seed(3)
    got = m(x, scale=scale)
    torch.manual_seed(3)
    want = model(x, scale=scale)  # the same dropout mask, batch statistics
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, first, atol=1e-3)


def test_a_module_captured_in_eval_mode_trains_with_batch_statistics():
    model = _net().eval()
    x, scale = _inputs()
    m = optimize(model, ["approx_bp"], (x,), {"scale": scale})
    assert not m.training and m.report.mode == "eval"
    assert _mode_flags(m) == {"dropout": [False], "batch_norm": [False]}
    torch.testing.assert_close(m(x, scale=scale), model(x, scale=scale))
    running_mean = model.bn.running_mean.clone()
    m.train()
    model.train()
    torch.manual_seed(5)
    got = m(x, scale=scale)
    assert not torch.equal(model.bn.running_mean, running_mean)  # batch statistics were used and recorded
    torch.manual_seed(5)
    torch.testing.assert_close(got, model(x, scale=scale))


def test_training_flag_follows_the_capture_mode_without_mode_dependent_ops():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    assert not optimize(mlp.eval(), ["approx_bp"], (x,)).training
    trained = optimize(mlp.train(), ["approx_bp"], (x,))
    assert trained.training
    assert not trained.eval().training and trained.train().training


def test_the_mode_argument_overrides_the_models_mode():
    model = _net().eval()
    x, scale = _inputs()
    m = optimize(model, [], (x,), {"scale": scale}, mode="train")
    assert m.training and m.report.mode == "train" and not model.training
    assert _mode_flags(m) == {"dropout": [True], "batch_norm": [True]}
    assert len(m.report) == 0


class DropPath(nn.Module):
    """Stochastic depth as EfficientNet and Swin write it: a Python branch on the mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.training and self.p > 0:
            keep = (torch.rand(x.shape[0], 1) >= self.p).to(x.dtype)
            return x * keep / (1 - self.p)
        return x


class ResidualDropPath(nn.Module):
    """x + DropPath(Linear -> GELU -> Dropout -> BatchNorm -> Linear)."""

    def __init__(self, p):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.drop_path = DropPath(p)

    def forward(self, x):
        return x + self.drop_path(self.fc2(self.bn(self.drop(self.act(self.fc1(x))))))


def test_a_switch_a_python_branch_on_the_mode_would_make_wrong_is_refused():
    x = _inputs()[0]
    # p = 0: both modes give one graph, up to dropout and batch norm, which switch as ever
    model = ResidualDropPath(0.0).train()
    m = optimize(model, ["approx_bp"], (x,))
    assert m.report.fixed_mode is None and m.report.notes == []
    assert m.eval() is m and _mode_flags(m) == {"dropout": [False], "batch_norm": [False]}
    torch.testing.assert_close(m(x), model.eval()(x))

    model = ResidualDropPath(0.2).train()
    m = optimize(model, ["approx_bp"], (x,))
    assert m.report.fixed_mode == (
        "in eval mode its Python computes another graph "
        "(first difference at node rand in drop_path, where the other mode's graph has add)"
    )
    assert m.report.notes == [
        m.report.fixed_mode + ": the result stays in train mode (.eval() raises); "
        "optimize(model, ..., mode='eval') rewrites it in eval mode"
    ]
    assert m.report.to_dict()["fixed_mode"] == m.report.fixed_mode
    assert m.train() is m and m.training  # the mode it was captured in: nothing to switch
    with pytest.raises(rewrite.RewriteError) as info:
        m.eval()
    assert str(info.value) == (
        "cannot switch the rewritten ResidualDropPath to eval mode: it was captured in train mode, and "
        f"{m.report.fixed_mode}, which switching its dropout and batch norm cannot give. "
        "Rewrite the model in eval mode for that: optimize(model, ..., mode='eval')"
    )
    assert m.training and _mode_flags(m) == {"dropout": [True], "batch_norm": [True]}

    evaluated = optimize(model, ["approx_bp"], (x,), mode="eval")  # the way out the message names
    torch.testing.assert_close(evaluated(x), model.eval()(x))
    with pytest.raises(rewrite.RewriteError, match="^cannot switch the rewritten ResidualDropPath to train mode: "):
        evaluated.train()


def test_a_refused_switch_stays_refused_after_save_and_load(tmp_path):
    m = optimize(ResidualDropPath(0.2).train(), ["approx_bp"], (_inputs()[0],))
    rewrite.save(m, tmp_path / "m.pt2")
    loaded = rewrite.load(tmp_path / "m.pt2")
    with pytest.raises(rewrite.RewriteError, match="drop_path"):
        loaded.eval()


# -- how passes are given ------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        ["approx_bp{norms=false}"],
        "approx_bp{norms=false}",
        [passes.ApproxBP(norms=False)],
        passes.ApproxBP(norms=False),
    ],
    ids=["spec-list", "spec", "object-list", "object"],
)
def test_passes_by_spec_and_object(given):
    model = _net().eval()
    x, _ = _inputs()
    m = optimize(model, given, (x,))
    entry = m.report["approx_bp"]
    assert entry.spec == "approx_bp{norms=false}"
    assert entry.options == {"gelu": True, "silu": True, "norms": False, "min_cosine": 0.9}
    targets = {n.target for n in m.graph.nodes}
    assert aten.layer_norm.default in targets and torch.ops.rewrite.regelu2.default in targets
    assert m.norm.weight is model.norm.weight and m.fc1.weight is model.fc1.weight  # nothing folded
    torch.testing.assert_close(m(x), model(x))


def test_passes_by_name_run_in_order():
    model = _net().eval()
    x, _ = _inputs()
    m = optimize(model, ["approx_bp{gelu=false}", "approx_bp"], (x,))
    first, second = m.report.passes
    assert [c.before for c in first.changes] == ["aten.layer_norm"]
    assert [c.before for c in second.changes] == ["aten.gelu"]
    assert first.after is not None and second.before is first.after


def test_unknown_pass_fails_before_capture():
    model = _net()
    with pytest.raises(rewrite.OptionError, match="unknown pass 'approx'"):
        optimize(model, ["approx"], _inputs()[:1])


# -- progress ------------------------------------------------------------------------------


def test_progress_true_prints_to_stderr(capsys):
    model = _net().eval()
    x, _ = _inputs()
    optimize(model, "approx_bp", (x,), progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert all(line.startswith("[rewrite ") for line in lines)
    assert "capturing Net" in lines[0]
    assert any("pass 1/1: approx_bp:" in line and "changed" in line for line in lines)
    assert any("checking approx_bp on the example inputs" in line for line in lines)


def test_progress_false_is_silent_and_a_callable_gets_the_messages(capsys):
    model = _net().eval()
    x, _ = _inputs()
    messages = []
    optimize(model, "approx_bp", (x,), progress=messages.append)
    optimize(model, "approx_bp", (x,))
    assert capsys.readouterr() == ("", "")
    assert messages[0] == "capturing Net" and messages[1] == "pass 1/1: approx_bp"


# -- a failed pass leaves the user's model alone -------------------------------------------


@dataclass(frozen=True)
class FoldThenFail(Pass):
    """Replaces parameters on its copy, then fails."""

    name: ClassVar[str] = "fold_then_fail"

    def run(self, gm, ctx):
        gm.fc1.weight = nn.Parameter(torch.zeros_like(gm.fc1.weight))
        del gm.fc2.bias
        raise ValueError("cannot fold")


@dataclass(frozen=True)
class ExactGeluToRelu(Pass):
    """Claims to be exact; is not (so it fails after the graph was run in train mode)."""

    name: ClassVar[str] = "exact_gelu_to_relu"

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.target is aten.gelu.default:
                node.target = aten.relu.default
        return PassResult()


@pytest.mark.parametrize("failing", [FoldThenFail(), ExactGeluToRelu()], ids=["raises", "wrong-numerics"])
def test_a_failed_pass_leaves_the_users_model_unchanged(failing):
    model = _net().train()
    model.bn.eval()  # mixed flags
    model.drop.eval()
    flags, snapshot = _flags(model), _snapshot(model)
    params = dict(model.named_parameters())
    x, scale = _inputs()
    with pytest.raises(PassError) as info:
        optimize(model, ["approx_bp{gelu=false}", failing], (x,), {"scale": scale}, mode="train")
    assert info.value.pass_name == failing.name
    assert _flags(model) == flags
    _assert_state(model, snapshot)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.norm.weight is params["norm.weight"] and model.fc2.bias is params["fc2.bias"]


def test_verify_false_gives_no_numerics():
    model = _net().eval()
    x, _ = _inputs()
    m = optimize(model, [ExactGeluToRelu()], (x,), verify=False)  # not checked, so not refused
    assert m.report["exact_gelu_to_relu"].numerics is None


def test_stderr_is_left_alone_by_default(capfd):
    model = _net().eval()
    optimize(model, "approx_bp", _inputs()[:1])
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# -- regressions found in review -----------------------------------------------------------


def test_capturing_a_rewritten_module_leaves_its_graph_mode_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.GELU())
    x = torch.randn(4, 8)
    first = optimize(model, ["approx_bp"], (x,), mode="train")
    optimize(first, ["approx_bp"], (x,), mode="eval")
    assert first.training
    dropout = [n for n in first.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert dropout and dropout[0].args[2] is True


def test_state_dict_keys_match_the_models_with_non_persistent_buffers():
    model, inputs = zoo.build("llama")  # RoPE tables are non-persistent buffers
    rewritten = optimize(model, ["approx_bp{norms=false}"], inputs)
    assert list(rewritten.state_dict()) == list(model.state_dict())
    rewritten.load_state_dict(model.state_dict())


def test_deepcopy_keeps_the_rewrite():
    model, inputs = zoo.build("mlp")
    rewritten = optimize(model, ["approx_bp"], inputs)
    copied = copy.deepcopy(rewritten)
    assert copied.report.passes[0].name == "approx_bp"
    torch.testing.assert_close(copied(*inputs), rewritten(*inputs))
    assert all(p is not q for p, q in zip(copied.parameters(), rewritten.parameters()))


def test_graphs_kept_for_inspection_do_not_hold_weights():
    model, inputs = zoo.build("llama")
    rewritten = optimize(model, ["approx_bp"], inputs)
    kept = [rewritten.before] + [g for p in rewritten.report for g in (p.before, p.after)]
    for gm in kept:
        assert all(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()])
    assert rewritten.report["approx_bp"].before is rewritten.before


@pytest.mark.parametrize(
    "arguments,mentions",
    [({"progress": 5}, "progress=5"), ({"codegen": "yes"}, "codegen='yes'"), ({"example_kwargs": [1]}, "example_kwargs")],
)
def test_arguments_of_the_wrong_kind_are_option_errors(arguments, mentions):
    model, inputs = zoo.build("mlp")
    with pytest.raises(rewrite.OptionError, match=re.escape(mentions)):
        optimize(model, ["approx_bp"], inputs, **arguments)


def test_a_dict_of_several_outputs_is_checked():
    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = torch.nn.Linear(4, 4), torch.nn.GELU()

        def forward(self, x):
            out = self.act(self.fc(x))
            return {"y": out, "z": out.sum()}

    rewritten = optimize(TwoOutputs(), ["approx_bp"], (torch.randn(3, 4),))
    numerics = rewritten.report.passes[0].numerics
    assert len(numerics.outputs) == 2 and numerics.forward_within_rounding and numerics.grad_untested is None
