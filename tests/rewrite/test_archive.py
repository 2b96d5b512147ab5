"""Crafted .pt2 archives: every place where torch.export.load would run code from the file
(unpickling, sympify, names written into generated source, guard code) is refused by
rewrite.load / load_program / `rewrite inspect` with one CheckpointError naming the part, and
the payload never runs. Each case first shows that the payload is live: torch.export.load on
the same file runs it (the payloads only create a marker file in a temporary folder)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite import optimize
from rewrite.archive import check_program
from rewrite.cli import main
from rewrite.errors import CheckpointError
from rewrite.serialize import load, load_program
from helpers import WritesMarker

MODEL_JSON = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = torch.tensor([2.0, 3.0, 4.0, 5.0])  # a plain attribute: a lifted tensor constant

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = WithConstant()
    path = tmp_path_factory.mktemp("clean") / "clean.pt2"
    # Saved by torch itself: rewrite.save turns constants into buffers, and any program must be read safely.
    torch.export.save(torch.export.export(model, (torch.randn(3, 4),)), path)
    return path


def _parts(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: archive.read(n) for n in names}


def _write(path: Path, root: str, parts: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in parts.items():  # a name starting with / goes at the top level
            archive.writestr(name[1:] if name.startswith("/") else f"{root}/{name}", data)
    return path


def _craft(clean: Path, out: Path, edit) -> Path:
    root, parts = _parts(clean)
    edit(parts)
    return _write(out, root, parts)


def _edit_json(parts, name, edit):
    value = json.loads(parts[name])
    edit(value)
    parts[name] = json.dumps(value).encode()


def _in_program(edit):
    """A craft that edits the program's JSON (models/model.json) with ``edit(program)``."""
    return lambda parts: _edit_json(parts, MODEL_JSON, edit)


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _first(config: dict, prefix: str) -> tuple[str, dict]:
    return next((k, v) for k, v in config["config"].items() if v["path_name"].startswith(prefix))


# -- the crafted archives -----------------------------------------------------------------------


def _pickled(config_name: str, directory: str, prefix: str):
    """A craft that marks the config's first tensor entry as pickled and stores the payload there."""

    def craft(parts, marker):
        def edit(config):
            _, entry = _first(config, prefix)
            entry["use_pickle"] = True
            parts[directory + entry["path_name"]] = _torch_save_bytes(WritesMarker(marker))

        _edit_json(parts, config_name, edit)

    return craft


pickled_weight = _pickled(WEIGHTS_CONFIG, "data/weights/", "weight_")
pickled_tensor_constant = _pickled(CONSTANTS_CONFIG, "data/constants/", "tensor_")


def opaque_object_constant(parts, marker):
    def edit(config):
        _, entry = _first(config, "tensor_")
        entry["path_name"] = "opaque_obj_0"
        entry["use_pickle"] = True
        parts["data/constants/opaque_obj_0"] = pickle.dumps(WritesMarker(marker))

    _edit_json(parts, CONSTANTS_CONFIG, edit)


def pickled_sample_inputs(parts, marker):
    parts[SAMPLE_INPUTS] = _torch_save_bytes(((torch.randn(3, 4),), {"evil": WritesMarker(marker)}))


def sympy_expression(parts, marker):
    def edit(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        meta = next(v for v in values.values() if v["sizes"])
        meta["sizes"][0] = {
            "as_expr": {"expr_str": f"__import__('pathlib').Path({str(marker)!r}).touch() or 3", "hint": {"as_int": 3}}
        }

    _edit_json(parts, MODEL_JSON, edit)


def parameter_name(parts, marker):
    """fx writes attribute paths into the module's source as getattr(x, "<name>")."""
    touch = f'getattr(getattr(__import__("pathlib"), "Path")("{marker}"), "touch")()'
    name = json.dumps(f'fc.w", {touch}) and getattr(self, "q')
    for part in (MODEL_JSON, WEIGHTS_CONFIG):
        parts[part] = parts[part].replace(b'"fc.weight"', name.encode())


def guard_code(parts, marker):
    def edit(program):
        program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() or True"]

    _edit_json(parts, MODEL_JSON, edit)


def legacy_layout(parts, marker):
    """The layout of torch < 2.7 (parts at the top level): torch falls back to it and unpickles
    its constants."""
    from torch._export.serde.schema import SCHEMA_VERSION

    program = parts[MODEL_JSON]
    parts.clear()
    parts["/version"] = ".".join(map(str, SCHEMA_VERSION)).encode()
    parts["/serialized_exported_program.json"] = program
    parts["/serialized_state_dict.pt"] = _torch_save_bytes({})
    parts["/serialized_constants.pt"] = _torch_save_bytes(WritesMarker(marker))
    parts["/serialized_example_inputs.pt"] = b""


RUNS_CODE = {
    "pickled weight": (pickled_weight, "data/weights/weight_"),
    "pickled tensor constant": (pickled_tensor_constant, "stored as a pickle"),
    "opaque object constant": (opaque_object_constant, "opaque_obj_0"),
    "pickled sample inputs": (pickled_sample_inputs, "sample inputs"),
    "sympy expression": (sympy_expression, "shape expression"),
    "parameter name": (parameter_name, "fc.w"),
    "guard code": (guard_code, "input guard"),
    "legacy layout": (legacy_layout, "torch < 2.7"),
}


def _torch_load_runs_it(path: Path, marker: Path) -> bool:
    try:
        torch.export.load(str(path)).module()(torch.randn(3, 4))
    except Exception:
        pass
    return marker.exists()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(RUNS_CODE))
def test_crafted_archive_is_refused_naming_the_part_and_nothing_runs(clean, tmp_path, case, caplog):
    craft, part = RUNS_CODE[case]
    marker = tmp_path / "pwned"
    root, parts = _parts(clean)
    craft(parts, marker)
    path = _write(tmp_path / "evil.pt2", root, parts)

    for reader in (load, load_program):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and part in message, message
        assert "\n" not in message
    assert not marker.exists(), "loading ran code from the file"

    with caplog.at_level(logging.CRITICAL):  # torch logs its fallbacks
        assert _torch_load_runs_it(path, marker), "the payload is not live: this case tests nothing"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(RUNS_CODE))
def test_inspect_refuses_a_crafted_archive_with_one_error_line(clean, tmp_path, case, capsys):
    craft, part = RUNS_CODE[case]
    marker = tmp_path / "pwned"
    path = _craft(clean, tmp_path / "evil.pt2", lambda parts: craft(parts, marker))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and part in err, err
    assert not marker.exists()


def _script_object_constant(parts):
    def edit(config):
        _, entry = _first(config, "tensor_")
        entry["path_name"] = "custom_obj_0"
        entry["use_pickle"] = True
        parts["data/constants/custom_obj_0"] = b"\x80\x04N."

    _edit_json(parts, CONSTANTS_CONFIG, edit)


@_in_program
def _call_target(program):
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


@_in_program
def _node_name(program):
    program["graph_module"]["graph"]["nodes"][0]["outputs"][0]["as_tensor"]["name"] = "a; print('x')"


@_in_program
def _string_input(program):
    program["graph_module"]["graph"]["inputs"].append({"as_string": "a'); print('x"})


@_in_program
def _class_as_target(program):
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.__class__"


@_in_program
def _power_in_guard(program):
    program["guards_code"] = ["L['x'].size()[0] ** 10**10**10 == 1"]


@_in_program
def _long_string_in_guard(program):
    program["guards_code"] = ["L['x'].size()[0] == ('a' * 100000000000 == 'b')"]


def _meta_device(parts):
    def edit(config):
        _, entry = _first(config, "weight_")
        entry["tensor_meta"]["device"] = {"type": "meta", "index": None}

    _edit_json(parts, WEIGHTS_CONFIG, edit)


def _aoti(parts):
    parts["data/aotinductor/model/model.so"] = b"\x7fELF"


@pytest.mark.parametrize(
    "craft, part",
    [
        (_script_object_constant, "custom_obj_0"),
        (_call_target, "torch.os.system"),
        (_node_name, "the name"),
        (_string_input, "string input"),
        (_aoti, "compiled code"),
        (_class_as_target, "operator"),
        (_power_in_guard, "input guard"),
        (_long_string_in_guard, "input guard"),
        (_meta_device, "device meta"),
    ],
    ids=[
        "script object",
        "call target",
        "node name",
        "string input",
        "compiled code",
        "class as target",
        "power in guard",
        "long string in guard",
        "meta device",
    ],
)
def test_other_parts_torch_would_run_or_write_into_source_are_refused(clean, tmp_path, craft, part):
    path = _craft(clean, tmp_path / "evil.pt2", craft)
    with pytest.raises(CheckpointError) as info:
        load_program(path)
    assert str(path) in str(info.value) and part in str(info.value)


def test_an_entry_stored_twice_is_refused(clean, tmp_path):
    root, parts = _parts(clean)
    path = _write(tmp_path / "twice.pt2", root, parts)
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr(f"{root}/{MODEL_JSON}", parts[MODEL_JSON])
    with pytest.raises(CheckpointError, match="twice"):
        load_program(path)


def test_compressed_parts_are_refused(clean, tmp_path):
    root, parts = _parts(clean)
    path = _write(tmp_path / "deflated.pt2", root, parts, zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed"):
        load_program(path)


def test_a_weight_that_reaches_past_its_bytes_is_refused(clean, tmp_path):
    def edit(parts):
        def grow(config):
            _, entry = _first(config, "weight_")
            entry["tensor_meta"]["sizes"][0] = {"as_int": 1000}

        _edit_json(parts, WEIGHTS_CONFIG, grow)

    path = _craft(clean, tmp_path / "long.pt2", edit)
    with pytest.raises(CheckpointError, match="reach past"):
        load_program(path)


def test_the_clean_archive_loads_with_tensors_aliased_and_shapes_symbolic(clean, tmp_path):
    program, _ = load_program(clean)
    reference = torch.export.load(str(clean))
    assert program.state_dict.keys() == reference.state_dict.keys()
    for name, tensor in reference.state_dict.items():
        assert torch.equal(program.state_dict[name], tensor) and type(program.state_dict[name]) is type(tensor)
    assert program.constants.keys() == reference.constants.keys()
    for name, tensor in reference.constants.items():
        assert torch.equal(program.constants[name], tensor)
    x = torch.randn(3, 4)
    assert torch.equal(program.module()(x), reference.module()(x))

    tied = nn.Linear(4, 4, bias=False)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = tied, nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    path = rewrite.save(optimize(Tied(), [], (torch.randn(3, 4),)), tmp_path / "tied.pt2")
    loaded, _ = load_program(path)
    weights = [t for t in loaded.state_dict.values()]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(64), Symbol('s77', positive=True, integer=True))",
        "FloorDiv(s0, 2) + Max(s1, 3)",
        "Eq(Mod(s0, 8), 0)",
    ],
)
def test_shape_expressions_torch_writes_pass_the_check(expression):
    program = {"graph_module": {"graph": {"sym_int_values": {"x": {"as_expr": {"expr_str": expression}}}}}}
    check_program(Path("p.pt2"), program)


@pytest.mark.parametrize(
    "expression",
    [
        "exec(chr(112)+chr(114))",
        "2**10**10**10",
        "Pow(Integer(10), Integer(10000000000))",
        "Mul(Integer(123456789012345678901234567890), s0)",
        "Symbol('__import__')",
        "Symbol('s0').__class__",
        "S('s0')",
        "s0 if s1 else s2",
        "[s0]",
        "sympify('1')",
    ],
)
def test_shape_expressions_that_could_run_code_are_refused(expression):
    program = {"graph_module": {"graph": {"sym_int_values": {"x": {"as_expr": {"expr_str": expression}}}}}}
    with pytest.raises(CheckpointError, match="shape expression"):
        check_program(Path("p.pt2"), program)


def test_an_aten_op_this_torch_does_not_have_is_not_called_a_custom_op(clean, tmp_path):
    def misspell(parts):
        def edit(program):
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.lineaz.default"

        _edit_json(parts, MODEL_JSON, edit)

    path = _craft(clean, tmp_path / "misspelt.pt2", misspell)
    with pytest.raises(CheckpointError, match=r"torch\.ops\.aten\.lineaz.*this torch") as info:
        load_program(path)
    assert "custom op" not in str(info.value)
