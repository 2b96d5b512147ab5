"""Capture: the mode asked for is the one recorded, the user's model keeps its flags, the batch
stays dynamic where it can, and a model torch.export cannot trace gets one clear error that
names the user's line, with torch's own log kept off the terminal."""

import importlib
import importlib.util
import inspect
import os

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite import CaptureError
from rewrite.capture import capture, user_frame

capture_module = importlib.import_module("rewrite.capture")  # `rewrite.capture` is also the function

aten = torch.ops.aten


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.5)
        self.inner = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.2))

    def forward(self, x):
        return self.inner(self.drop(self.fc(x)))


def _dropout_flags(gm) -> list[bool]:
    return [n.args[2] for n in gm.graph.nodes if n.target is aten.dropout.default]


def _flags(model) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("mode,flag", [("train", True), ("eval", False)])
def test_mode_is_recorded_in_the_graph(mode, flag):
    model = DropNet()
    captured = capture(model, (torch.randn(3, 6),), mode=mode)
    assert captured.mode == mode
    assert _dropout_flags(captured.graph_module) == [flag, flag]


@pytest.mark.parametrize("training", [True, False])
def test_default_mode_is_the_models_current_mode(training):
    model = DropNet().train(training)
    captured = capture(model, torch.randn(3, 6))  # a bare tensor is one positional input
    assert captured.mode == ("train" if training else "eval")
    assert _dropout_flags(captured.graph_module) == [training, training]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_users_model_keeps_its_flags_including_mixed_submodules(mode):
    model = DropNet().train()
    model.inner.eval()  # a submodule in the other mode
    model.drop.eval()
    before = _flags(model)
    assert len(set(before.values())) == 2
    captured = capture(model, (torch.randn(3, 6),), mode=mode)
    assert _flags(model) == before
    flag = mode == "train"
    assert _dropout_flags(captured.graph_module) == [flag, flag]  # the mode asked for, everywhere


def test_the_model_keeps_its_flags_and_weights_when_capture_fails():
    model = Branchy().eval()
    model.lin.train()
    before = _flags(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError):
        capture(model, (torch.randn(3, 4),), mode="train")
    assert _flags(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_capture_shares_parameters_and_does_not_touch_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(model, (torch.randn(5, 4),))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p in captured.graph_module.named_parameters())


# -- the other mode -------------------------------------------------------------------------


class ModeReader(nn.Module):
    """Python that reads the mode: ``branch`` says what it changes in train mode."""

    def __init__(self, branch: str):
        super().__init__()
        self.branch = branch
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(self.bn(self.fc(x)))
        g = torch.tanh(x)
        if self.branch == "nothing" and self.training:
            return h + g
        if self.branch == "input":  # the same ops in both modes, one input swapped
            return (h if self.training else g) * g + h
        if self.branch == "outputs" and self.training:  # the same ops, one output more
            return h + g, g
        if self.branch == "op" and self.training:
            return (h + g).relu()
        return h + g


def _exports(monkeypatch) -> list:
    calls = []
    export = capture_module._export
    monkeypatch.setattr(capture_module, "_export", lambda *a: calls.append(a[-1]) or export(*a))
    return calls


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_mode_read_that_changes_no_op_costs_no_second_export(mode, monkeypatch):
    exports = _exports(monkeypatch)
    model = ModeReader("nothing").train()
    captured = capture(model, (torch.randn(3, 4),), mode=mode)
    assert captured.fixed_mode is None and exports == [mode == "train"]
    assert _flags(model) == {name: True for name in _flags(model)}  # as they were


@pytest.mark.parametrize(
    "branch, difference",
    [
        ("input", "(first difference at node mul in the top-level module)"),
        ("outputs", "(first difference at node output in the top-level module)"),
        ("op", "(first difference at node relu in the top-level module, where the other mode's graph has output)"),
    ],
)
def test_a_mode_read_that_changes_what_is_computed_is_exported_in_the_other_mode(branch, difference, monkeypatch):
    exports = _exports(monkeypatch)
    captured = capture(ModeReader(branch), (torch.randn(3, 4),), mode="train")
    assert exports == [True, False]
    assert captured.fixed_mode == f"in eval mode its Python computes another graph {difference}"


# -- dynamic batch -------------------------------------------------------------------------


def test_dynamic_batch_accepts_another_batch_size():
    model = DropNet().eval()
    captured = capture(model, (torch.randn(3, 6),))
    assert captured.dynamic_inputs == ["x"]
    assert captured.notes == []
    x_val = next(iter(captured.graph_module.graph.find_nodes(op="placeholder"))).meta["val"]
    assert isinstance(x_val.shape[0], torch.SymInt) and x_val.shape[1] == 6
    for batch in (3, 7, 2):
        x = torch.randn(batch, 6)
        torch.testing.assert_close(captured.graph_module(x), model(x))
    assert captured.example_args[0].shape == (3, 6) and captured.example_kwargs == {}
    assert captured.seconds > 0


def test_a_batch_of_one_is_specialised_with_a_note():
    captured = capture(DropNet().eval(), (torch.randn(1, 6),))
    assert captured.dynamic_inputs == []
    assert len(captured.notes) == 1
    assert "example batch is 1" in captured.notes[0] and "specialises" in captured.notes[0]
    x_val = next(iter(captured.graph_module.graph.find_nodes(op="placeholder"))).meta["val"]
    assert x_val.shape == (1, 6)


def test_static_shapes_when_dynamic_batch_is_off():
    captured = capture(DropNet().eval(), (torch.randn(3, 6),), dynamic_batch=False)
    assert captured.dynamic_inputs == [] and captured.notes == [] and captured.dynamic_shapes is None
    for node in captured.graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(s, int) for s in val.shape), node.name
    with pytest.raises(Exception):
        captured.graph_module(torch.randn(4, 6))


class WithKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        out = self.fc(x) * scale
        return out if mask is None else out * mask


def test_keyword_inputs():
    model = WithKwargs()
    x, mask = torch.randn(3, 4), torch.rand(3, 3)
    captured = capture(model, [x], {"mask": mask, "scale": 2.0})
    assert isinstance(captured.example_args, tuple) and captured.example_kwargs["mask"] is mask
    assert sorted(captured.dynamic_inputs) == ["mask", "x"]
    gm = captured.graph_module
    torch.testing.assert_close(gm(x, mask=mask, scale=2.0), model(x, mask=mask, scale=2.0))
    x5, mask5 = torch.randn(5, 4), torch.rand(5, 3)
    torch.testing.assert_close(gm(x5, mask=mask5, scale=2.0), model(x5, mask=mask5, scale=2.0))


def test_variadic_inputs_keep_a_dynamic_batch():
    class Positional(nn.Module):
        def forward(self, *args):
            return args[0] * 2 + args[1]

    model = Positional()
    captured = capture(model, (torch.randn(3, 2), torch.randn(3, 2)))
    assert len(captured.dynamic_inputs) == 2 and captured.notes == []
    a, b = torch.randn(5, 2), torch.randn(5, 2)
    torch.testing.assert_close(captured.graph_module(a, b), model(a, b))


def test_inputs_that_do_not_fit_the_forward_signature_are_a_capture_error():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(CaptureError, match="TwoInputs itself fails on the example inputs .*missing 1 required positional argument: 'y'"):
        capture(TwoInputs(), (torch.randn(3, 2),))
    with pytest.raises(CaptureError, match="TwoInputs"):
        capture(TwoInputs(), (torch.randn(3, 2),), {"z": torch.randn(3, 2)}, dynamic_batch=False)


# -- errors --------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow
            return y * 2
        return y


BRANCH_LINE = inspect.getsourcelines(Branchy.forward)[1] + 2


def test_data_dependent_control_flow_names_the_users_line_quietly(capsys):
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(3, 4),))
    message = str(info.value)
    assert f"{__file__}:{BRANCH_LINE}" in message
    assert "if y.sum() > 0:" in message
    assert "Branchy" in message
    assert "data-dependent" in message and "torch.cond" in message  # what to do
    assert len(message.splitlines()) == 1 and len(message) < 1000
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert isinstance(info.value, rewrite.RewriteError)


def test_a_failed_capture_writes_nothing_to_the_terminal_at_all(capfd):
    with pytest.raises(CaptureError):
        capture(Branchy(), (torch.randn(3, 4),), mode="eval")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_capture_restores_torch_loggers_after_a_failure():
    import logging

    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    with pytest.raises(CaptureError):
        capture(Branchy(), (torch.randn(3, 4),))
    assert logger.level == level


@pytest.mark.parametrize("model", [lambda x: x * 2, nn.Linear, "model", None])
def test_a_model_that_is_not_a_module_is_refused(model):
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        capture(model, (torch.randn(2, 2),))


@pytest.mark.parametrize("mode", ["training", "Train", "", "inference"])
def test_a_bad_mode_is_refused(mode):
    with pytest.raises(CaptureError, match="mode must be 'train' or 'eval'") as info:
        capture(nn.Linear(2, 2), (torch.randn(2, 2),), mode=mode)
    assert repr(mode) in str(info.value)


@pytest.mark.parametrize("inputs", [None, {"x": 1}, 3.0])
def test_bad_example_inputs_are_refused(inputs):
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(nn.Linear(2, 2), inputs)


def test_a_shape_error_in_the_model_is_a_capture_error_naming_its_line():
    class WrongShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)  # x has 4 features

    with pytest.raises(CaptureError, match="WrongShape") as info:
        capture(WrongShape(), (torch.randn(2, 4),))
    assert f"{os.path.basename(__file__)}:" in str(info.value)
    assert "return self.fc(x)" in str(info.value)


# -- where the user's code is --------------------------------------------------------------


def _raise_from(path, monkeypatch=None):
    """Import a module at ``path`` whose function raises, and return the exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("def fail():\n    x = 1\n    raise ValueError('boom')\n")
    spec = importlib.util.spec_from_file_location(f"m_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.fail()
    except ValueError as exc:
        return exc
    raise AssertionError("fail() did not raise")


def test_user_frame_skips_torch_but_not_packages_whose_name_starts_like_it(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "_TORCH_DIR", str(tmp_path / "torch"))
    inside = _raise_from(tmp_path / "torch" / "inner.py")
    assert "inner.py" not in user_frame(inside)  # the caller here is found instead
    beside = _raise_from(tmp_path / "torchvision_models" / "resnet.py")
    assert user_frame(beside).endswith("resnet.py:3: raise ValueError('boom')")


def test_user_frame_names_models_installed_under_the_standard_library(tmp_path, monkeypatch):
    # Python images install packages in <stdlib>/site-packages: a model from there is the user's.
    monkeypatch.setattr(capture_module, "_STDLIB_DIR", str(tmp_path / "lib"))
    stdlib = _raise_from(tmp_path / "lib" / "json_like.py")
    assert "json_like.py" not in user_frame(stdlib)
    installed = _raise_from(tmp_path / "lib" / "site-packages" / "hub_model.py")
    assert "hub_model.py:3" in user_frame(installed)


def test_user_frame_of_ordinary_code(tmp_path):
    assert user_frame(_raise_from(tmp_path / "examples" / "mine.py")).endswith("mine.py:3: raise ValueError('boom')")
    exc = ValueError("no traceback")
    assert user_frame(exc) == ""
