"""Saving and loading: rewritten modules round-trip through .pt2 (outputs, dynamic batch,
training, train/eval, the report), load in a fresh interpreter after `import rewrite` only,
compile with torch.compile; files are written atomically; checkpoints are read without
running pickled code, and every bad file gets a CheckpointError that names it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from rewrite import optimize, zoo
from rewrite.errors import CaptureError, CheckpointError
from rewrite.module import RewrittenModule
from rewrite.serialize import REPORT_FILE, atomic_write, load, load_program, load_state_dict, save
from helpers import WritesMarker

REWRITE_OPS = ("rewrite.regelu2", "rewrite.ms_layer_norm")


def _op_names(gm: torch.fx.GraphModule) -> set[str]:
    return {
        f"{n.target._schema.name.replace('::', '.')}"
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


class NormDropoutNet(nn.Module):
    """LayerNorm -> Linear -> GELU -> BatchNorm -> Dropout -> Linear: mode-dependent ops."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(self.bn(self.act(self.fc1(self.norm(x))))))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.fc(x)
        return -self.fc(x)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model, inputs = zoo.build("mlp")
    return model, inputs, optimize(model, ["approx_bp"], inputs)


@pytest.fixture(scope="module")
def saved(mlp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    path = save(mlp[2], folder / "mlp.pt2")
    return path


@pytest.fixture(scope="module")
def loaded(saved):
    return load(saved)


@pytest.fixture(scope="module")
def mode_net(tmp_path_factory):
    torch.manual_seed(0)
    model, x = NormDropoutNet(), torch.randn(6, 16)
    rewritten = optimize(model, ["approx_bp"], (x,))
    path = save(rewritten, tmp_path_factory.mktemp("mode") / "net.pt2")
    return model, x, path


# -- round trip ----------------------------------------------------------------------------


def test_save_writes_a_pt2_archive_with_the_report_and_nothing_else(saved):
    assert saved.suffix == ".pt2" and saved.is_file()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["mlp.pt2"]
    with zipfile.ZipFile(saved) as archive:
        assert any(name.endswith(REPORT_FILE) for name in archive.namelist())


def test_loaded_module_is_a_rewritten_module_with_the_rewrite_ops(loaded):
    assert isinstance(loaded, RewrittenModule)
    assert set(REWRITE_OPS) <= _op_names(loaded)
    assert "aten.gelu" not in _op_names(loaded)


def test_loaded_outputs_equal_on_the_example_inputs(mlp, loaded):
    model, inputs, rewritten = mlp
    with torch.no_grad():
        out = loaded(*inputs)
        assert torch.equal(out, rewritten(*inputs))
        torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 16])
def test_loaded_module_takes_other_batch_sizes(mlp, loaded, batch):
    model, inputs, rewritten = mlp
    assert inputs[0].shape[0] != batch
    x = torch.randn(batch, 64)
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == (batch, 10)
        assert torch.equal(out, rewritten(x))
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_loaded_module_saved_again_keeps_the_dynamic_batch(loaded, tmp_path):
    again = load(save(loaded, tmp_path / "again.pt2"))
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


def test_loaded_module_trains(mlp, saved):
    _, inputs, rewritten = mlp
    fresh = load(saved)
    params = dict(fresh.named_parameters())
    assert params, "the loaded module has no parameters to train"
    loss = fresh(*inputs).pow(2).mean()
    loss.backward()
    missing = [name for name, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"

    # Same gradients as the module that was saved (same graph, same custom backward).
    rewritten.zero_grad(set_to_none=True)
    rewritten(*inputs).pow(2).mean().backward()
    for name, p in rewritten.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-5, atol=1e-7)
    rewritten.zero_grad(set_to_none=True)

    before = fresh(*inputs).detach()
    torch.optim.SGD(fresh.parameters(), lr=0.1).step()
    assert not torch.equal(fresh(*inputs).detach(), before)


def test_loaded_module_switches_between_train_and_eval(mode_net):
    model, x, path = mode_net
    net = load(path)
    assert net.training  # captured (and saved) in train mode

    net.eval()
    model.eval()
    assert not net.training
    tracked = net.get_buffer("bn.num_batches_tracked").clone()
    running = net.get_buffer("bn.running_mean").clone()
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out, net(x)), "eval mode must be deterministic (dropout off)"
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(net.get_buffer("bn.num_batches_tracked"), tracked)
    assert torch.equal(net.get_buffer("bn.running_mean"), running)

    net.train()
    assert net.training
    with torch.no_grad():
        a, b = net(x), net(x)
    assert not torch.equal(a, b), "train mode must apply dropout"
    assert int(net.get_buffer("bn.num_batches_tracked")) == int(tracked) + 2
    assert not torch.equal(net.get_buffer("bn.running_mean"), running)


def test_saved_report_comes_back_as_a_dict(mlp, saved, loaded):
    expected = json.loads(json.dumps(mlp[2].report.to_dict()))
    program, report = load_program(saved)
    assert isinstance(program, torch.export.ExportedProgram)
    assert isinstance(report, dict) and report == expected
    assert loaded.report == expected
    assert report["model"] == "MLP"
    assert [p["name"] for p in report["passes"]] == ["approx_bp"]
    assert len(report["passes"][0]["changes"]) == 4


def test_program_without_report_loads_with_report_none(tmp_path):
    model, x = nn.Linear(3, 2), torch.randn(2, 3)
    torch.export.save(torch.export.export(model, (x,), strict=False), tmp_path / "plain.pt2")
    program, report = load_program(tmp_path / "plain.pt2")
    assert report is None
    module = load(tmp_path / "plain.pt2")
    assert module.report is None
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x))


def test_save_of_a_plain_module_needs_example_inputs(tmp_path):
    model, x = nn.Linear(3, 2), torch.randn(2, 3)
    with pytest.raises(CheckpointError, match="example"):
        save(model, tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []
    path = save(model, tmp_path / "m.pt2", example_args=(x,))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), model(x))


def test_save_of_a_model_export_cannot_capture_is_a_clear_error(tmp_path, capfd):
    with pytest.raises(CaptureError) as info:
        save(Branchy(), tmp_path / "b.pt2", example_args=(torch.randn(3, 8),))
    message = str(info.value)
    assert "Branchy" in message and "data-dependent" in message
    assert "test_serialize.py" in message  # points at the user's line
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert "def forward" not in out + err, "torch.export's partial graph leaked to the terminal"


# -- a fresh interpreter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unregistered_op_pt2(tmp_path_factory):
    """A .pt2 using a custom op that only this test process defines."""

    @torch.library.custom_op("rewrite_serialize_test::double_it", mutates_args=())
    def double_it(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double_it.register_fake
    def _(x):
        return torch.empty_like(x)

    class UsesOp(nn.Module):
        def forward(self, x):
            return torch.ops.rewrite_serialize_test.double_it(x) + 1

    path = tmp_path_factory.mktemp("op") / "op.pt2"
    torch.export.save(torch.export.export(UsesOp(), (torch.randn(3),), strict=False), path)
    x = torch.randn(3)
    assert torch.equal(load(path)(x), x * 2 + 1)  # loads here, where the op is registered
    return path


@pytest.fixture(scope="module")
def fresh_process(mlp, saved, unregistered_op_pt2, tmp_path_factory):
    """Load the saved module in a new interpreter that imports nothing but torch and rewrite."""
    folder = tmp_path_factory.mktemp("fresh")
    _, inputs, rewritten = mlp
    x7 = torch.randn(7, 64)
    with torch.no_grad():
        torch.save({"x": inputs[0], "y": rewritten(*inputs), "x7": x7, "y7": rewritten(x7)}, folder / "io.pt")
    code = f"""
        import json, sys
        import torch
        import rewrite
        result = {{"passes_imported": any(m == "passes" or m.startswith("passes.") for m in sys.modules)}}
        io = torch.load({str(folder / "io.pt")!r}, weights_only=True)
        program = torch.export.load({str(saved)!r})  # torch's own loader: the ops are registered
        result["program_equal"] = torch.equal(program.module()(io["x"]), io["y"])
        from rewrite.serialize import load
        module = load({str(saved)!r})
        with torch.no_grad():
            result["equal"] = torch.equal(module(io["x"]), io["y"])
            result["equal_batch_7"] = torch.equal(module(io["x7"]), io["y7"])
        result["report_model"] = module.report["model"]
        try:
            load({str(unregistered_op_pt2)!r})
            result["unregistered"] = "loaded"
        except rewrite.CheckpointError as exc:
            result["unregistered"] = str(exc)
        print(json.dumps(result))
    """
    proc = _run_python(code, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_fresh_process_with_import_rewrite_loads_the_module(fresh_process):
    result, _ = fresh_process
    assert result["program_equal"] and result["equal"] and result["equal_batch_7"]
    assert result["report_model"] == "MLP"


def test_fresh_process_needs_only_rewrite_not_the_passes(fresh_process):
    result, _ = fresh_process
    assert result["passes_imported"] is False


def test_unregistered_custom_op_is_named_in_the_error(fresh_process, unregistered_op_pt2):
    result, stderr = fresh_process
    message = result["unregistered"]
    assert message != "loaded"
    assert str(unregistered_op_pt2) in message
    assert "torch.ops.rewrite_serialize_test.double_it" in message
    assert "import" in message and "warnings above" not in message
    assert "Traceback" not in stderr and "double_it" not in stderr, "torch's deserializing traceback leaked"


@pytest.mark.slow
def test_fresh_process_without_import_rewrite_cannot_load(saved, tmp_path):
    code = f"""
        import sys
        import torch
        assert "rewrite" not in sys.modules
        torch.export.load({str(saved)!r})
        print("LOADED")
    """
    proc = _run_python(code, tmp_path)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "torch.ops.rewrite." in proc.stderr


# -- torch.compile -----------------------------------------------------------------------------


def test_rewritten_module_compiles_forward_and_backward(mlp):
    _, inputs, rewritten = mlp
    import torch._dynamo

    torch._dynamo.reset()
    try:
        compiled = torch.compile(rewritten)
        rewritten.zero_grad(set_to_none=True)
        out = compiled(*inputs)
        out.pow(2).mean().backward()
        compiled_grads = {n: p.grad.clone() for n, p in rewritten.named_parameters()}
        rewritten.zero_grad(set_to_none=True)
        eager = rewritten(*inputs)
        eager.pow(2).mean().backward()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        for name, p in rewritten.named_parameters():
            torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        rewritten.zero_grad(set_to_none=True)
        torch._dynamo.reset()


# -- writing files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model", "model.pt2.tmp", "model.safetensors"])
def test_save_refuses_a_name_not_ending_in_pt2(mlp, tmp_path, name):
    with pytest.raises(CheckpointError, match=r"\.pt2") as info:
        save(mlp[2], tmp_path / name)
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_missing_folder(mlp, tmp_path):
    target = tmp_path / "missing" / "model.pt2"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        save(mlp[2], target)
    assert "missing" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _disk_fills_up(monkeypatch):
    """The disk fills while the file is written: part of it is on disk, then ENOSPC."""

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def test_failed_save_leaves_the_existing_file_and_no_temporary_files(mlp, tmp_path, monkeypatch):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"the user's old model")
    _disk_fills_up(monkeypatch)
    with pytest.raises(CheckpointError, match="No space left") as info:
        save(mlp[2], target)
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"the user's old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


def test_several_files_are_written_all_or_nothing(tmp_path, monkeypatch):
    first, second = tmp_path / "a.pt2", tmp_path / "b.html"
    first.write_bytes(b"old a")
    real_replace = os.replace

    def replace_fails_for_b(src, dst):
        if Path(dst) == second:
            raise OSError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_for_b)
    with pytest.raises(CheckpointError, match="Permission denied"):
        atomic_write({second: "new b", first: b"new a"})
    assert first.read_bytes() == b"old a" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt2"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        (path,) = atomic_write({tmp_path / "out.html": "page"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_temporaries_a_killed_run_left_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.pt2.{dead.pid}.rewrite-tmp"
    stale.write_bytes(b"half a zip")
    alive = tmp_path / f".out.pt2.{os.getppid()}.rewrite-tmp"  # a running process: maybe writing it now
    alive.write_bytes(b"in progress")
    other = tmp_path / ".other.pt2.1.rewrite-tmp"
    other.write_bytes(b"not ours to judge")
    atomic_write({tmp_path / "out.pt2": b"new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.pt2", alive.name, other.name])


@pytest.mark.slow
def test_sigterm_while_writing_removes_the_temporary_file(tmp_path):
    target = tmp_path / "out.pt2"
    script = textwrap.dedent(f"""
        import os, time
        from rewrite.serialize import atomic_write
        os.fsync = lambda fd: time.sleep(60)  # a slow disk: the signal comes while writing
        atomic_write({{{str(target)!r}: b"x" * 1000}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.pt2.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.pt2.*")), "the writer never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_successful_save_replaces_the_existing_file_without_temporary_files(mlp, tmp_path):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"the user's old model")
    save(mlp[2], target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
    assert zipfile.is_zipfile(target)
    with torch.no_grad():
        assert torch.equal(load(target)(*mlp[1]), mlp[2](*mlp[1]))


# -- state dicts --------------------------------------------------------------------------------


def _assert_same_state(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in zoo.mlp(hidden=16).state_dict().items()}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_load_state_dict_reads_a_plain_torch_state_dict(state, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    torch.save(state, path)
    _assert_same_state(load_state_dict(path), state)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_load_state_dict_reads_a_state_dict_nested_in_a_training_checkpoint(state, tmp_path, key):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, key: state, "lr": 0.1}, path)
    _assert_same_state(load_state_dict(path), state)


def test_load_state_dict_reads_safetensors(state, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    _assert_same_state(load_state_dict(path), state)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "save_options", [{}, {"pickle_protocol": 4}, {"_use_new_zipfile_serialization": False}], ids=["zip", "protocol4", "legacy"]
)
def test_load_state_dict_refuses_a_pickled_module_and_says_to_save_a_state_dict(tmp_path, save_options):
    path = tmp_path / "model.pt"
    torch.save(zoo.mlp(hidden=16), path, **save_options)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "state dict" in message and "state_dict()" in message


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_load_state_dict_never_unpickles_code(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"weight": torch.ones(2), "payload": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_state_dict(path)
    assert not marker.exists(), "loading ran the pickled code"

    # The payload is live: an unguarded unpickle would have created the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 5])
def test_load_state_dict_refuses_a_plain_pickle_of_code(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=protocol))
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        load_state_dict(path)
    assert "state dict" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,expected",
    [({"epoch": 3, "lr": 0.1}, "epoch"), ([torch.ones(2)], "list")],
)
def test_load_state_dict_refuses_what_is_not_a_state_dict(tmp_path, content, expected):
    path = tmp_path / "thing.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="not a state dict") as info:
        load_state_dict(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_load_state_dict_refuses_an_unknown_file_type(state, tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unknown checkpoint type") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


# -- bad files ------------------------------------------------------------------------------------


def _random_bytes(n: int = 4096) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes()


@pytest.fixture
def truncated(state, tmp_path):
    """Files cut in half: the zip's central directory (or safetensors' data) is gone."""

    def make(suffix: str) -> Path:
        whole = tmp_path / f"whole{suffix}"
        if suffix == ".safetensors":
            save_file(state, str(whole))
        elif suffix == ".pt2":
            model = nn.Linear(4, 3)
            torch.export.save(torch.export.export(model, (torch.randn(2, 4),), strict=False), whole)
        else:
            torch.save(state, whole)
        data = whole.read_bytes()
        whole.unlink()
        path = tmp_path / f"truncated{suffix}"
        path.write_bytes(data[: len(data) // 2])
        return path

    return make


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_state_dict_is_a_checkpoint_error_naming_the_file(tmp_path, suffix, truncated):
    for path in (tmp_path / f"random{suffix}", truncated(suffix), tmp_path / f"empty{suffix}"):
        if path.name.startswith("random"):
            path.write_bytes(_random_bytes())
        elif path.name.startswith("empty"):
            path.write_bytes(b"")
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
        message = str(info.value)
        assert str(path) in message
        # Corrupt bytes are not "pickled objects": that message would send the user the wrong way.
        assert "pickled" not in message, message


@pytest.mark.parametrize("how", ["random", "truncated", "empty", "torch.save"])
def test_corrupt_pt2_is_a_checkpoint_error_naming_the_file(tmp_path, truncated, state, how):
    if how == "truncated":
        path = truncated(".pt2")
    else:
        path = tmp_path / f"{how}.pt2"
        if how == "random":
            path.write_bytes(_random_bytes())
        elif how == "empty":
            path.write_bytes(b"")
        else:
            torch.save(state, path)  # a zip, but not a torch.export archive
    for reader in (load, load_program):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        assert str(path) in str(info.value)
        assert "warnings above" not in str(info.value)


@pytest.mark.parametrize("reader", [load, load_program, load_state_dict])
def test_missing_file_is_a_checkpoint_error(tmp_path, reader):
    path = tmp_path / "nowhere.pt2"
    with pytest.raises(CheckpointError, match="no such file") as info:
        reader(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not a file"):
        reader(tmp_path)
