"""Reading a ``.pt2`` archive without running anything from it.

``torch.export.load`` unpickles parts of an archive with ``weights_only=False`` (weights and
constants marked ``use_pickle``, ``custom_obj_*`` / ``opaque_obj_*`` constants, sample inputs
that the safe loader refused, the layout of torch < 2.7), evaluates the symbolic shape
expressions it finds with ``sympy.sympify`` (an ``eval``), and writes the names, node targets
and input guards of the saved graph into the Python source of the module it builds. A crafted
archive can run code through any of these. So the archive is read here part by part: every
part that would be unpickled other than with ``weights_only=True`` is refused, tensors are
built from their raw bytes, sample inputs are read with ``weights_only=True``, and the program
text is checked (names are identifiers, targets are operators, shape expressions and guards
use a small grammar) before torch's deserializer sees it.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import operator
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde import serialize as serde
from torch.export.pt2_archive import constants as layout

from rewrite.errors import CheckpointError

MODEL = "model"  # the program's name inside archives written by torch.export.save
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FQN = re.compile(r"(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?")  # "" is the root module
_OP_TARGET = re.compile(r"torch\.ops(?:\.[A-Za-z_][A-Za-z0-9_]*){2,3}")  # aten.__and__.Tensor too
# Shape expressions as torch writes them (sympy's srepr: ``Mul(Integer(64), Symbol('s77',
# positive=True))``): numbers, operators, quoted symbol names, keyword arguments and names
# (checked against the list below). No other strings, no dots outside numbers, no brackets:
# the only calls left are to the sympy functions allowed below.
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d{1,19}(?:\.\d{0,19})?(?![\d.]))|'(?P<symbol>[A-Za-z_][A-Za-z0-9_]*)'"
    r"|(?P<keyword>[a-z_]+)\s*=(?!=)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?://|[-+*/%(),<>=!&|~]=?(?!\*)))"
)
_SYMBOL = re.compile(r"(?:s|u|zf|zuf)\d+")  # torch's symbol names: sizes, unbacked ints, floats
_EXPR_FUNCTIONS = {
    # sympy's own, as torch prints symbolic sizes and conditions
    # (no powers: a power of two numbers is evaluated, and can be made to take forever)
    "Symbol",
    "Integer",
    "Rational",
    "Float",
    "Add",
    "Mul",
    "Mod",
    "Min",
    "Max",
    "Abs",
    "floor",
    "ceiling",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "StrictLessThan",
    "StrictGreaterThan",
    "LessThan",
    "GreaterThan",
    "Equality",
    "Unequality",
    "And",
    "Or",
    "Not",
    "Piecewise",
    "ExprCondPair",
    "true",
    "false",
    "True",
    "False",
    "BooleanTrue",
    "BooleanFalse",
    "oo",
    "zoo",
    "nan",
    "Infinity",
    "NegativeInfinity",
    "NaN",
    "Half",
    "One",
    "Zero",
    "NegativeOne",
    # torch.utils._sympy's, which torch's deserializer lets shape expressions call
    "FloorDiv",
    "ModularIndexing",
    "Where",
    "PythonMod",
    "Mod",
    "CleanDiv",
    "CeilToInt",
    "FloorToInt",
    "CeilDiv",
    "LShift",
    "RShift",
    "FloatTrueDiv",
    "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat",
    "TruncToInt",
    "RoundToInt",
    "RoundDecimal",
    "ToFloat",
    "Identity",
}
_MAX_TEXT = 10_000  # characters of one shape expression or guard: torch's are a few dozen
_GUARD_CALLS = {"size", "stride", "storage_offset", "dim", "numel"}


def _refuse(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{path}: {message}; rewrite does not load it (loading it could run code from the file)")


def read_program(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """The ExportedProgram saved in ``path`` and its extra files (name -> text)."""
    with zipfile.ZipFile(path) as archive:
        parts = _parts(path, archive)

        def read(name: str) -> bytes:
            if name not in parts:
                raise CheckpointError(f"{path}: the archive has no {name}; is it corrupt?")
            return archive.read(parts[name])

        _check_layout(path, parts, read)
        program_json = _json(path, read(layout.MODELS_FILENAME_FORMAT.format(MODEL)), "the program")
        check_program(path, program_json)
        state_dict = _tensors(path, read, layout.WEIGHTS_DIR, layout.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL))
        constants = _tensors(path, read, layout.CONSTANTS_DIR, layout.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL))
        example_inputs = _sample_inputs(path, read(layout.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL)))
        extra = {
            name[len(layout.EXTRA_DIR) :]: _text(path, read(name), name)
            for name in parts
            if name.startswith(layout.EXTRA_DIR)
        }
    try:
        serialized = serde._dict_to_dataclass(schema.ExportedProgram, program_json)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: its program ({layout.MODELS_FILENAME_FORMAT.format(MODEL)}) is malformed: {exc}"
        ) from exc
    program = serde.ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
    _check_targets(path, program.graph_module)
    return program, extra


def _check_targets(path: Path, graph_module: torch.fx.GraphModule) -> None:
    """Every call in the graph (subgraphs included) is of an operator: the names in the file
    passed the check, and here is what torch looked them up as."""
    allowed = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    for module in graph_module.modules():
        for node in getattr(getattr(module, "graph", None), "nodes", ()):
            target = node.target
            if node.op == "call_function" and not (
                isinstance(target, allowed) or target in serde._SYM_OPS or target is operator.getitem
            ):
                raise _refuse(path, f"its program calls {target!r} at node {node.name}, which is not an operator")


def _parts(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by their name under its one top folder (as torch's reader sees them)."""
    infos = archive.infolist()
    if "serialized_exported_program.json" in archive.namelist():
        raise _refuse(
            path,
            "is in the layout of torch < 2.7, whose parts torch unpickles; save it again with a recent torch.export.save",
        )
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        raise CheckpointError(f"{path}: not a torch.export archive (its entries are not all in one top folder)")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):  # readers differ on which copy they take
        raise CheckpointError(f"{path}: holds some entries twice; is it a .pt2 written by torch.export.save?")
    for info in infos:
        # torch.export.save stores every part as is; a compressed part could unpack to any size.
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: {info.filename} is compressed, which torch.export.save never does; is it a .pt2?"
            )
    return {info.filename.split("/", 1)[1]: info for info in infos if not info.is_dir()}


def _check_layout(path: Path, parts: dict, read) -> None:
    if layout.ARCHIVE_FORMAT_PATH not in parts:
        raise CheckpointError(f"{path}: not a torch.export archive (no {layout.ARCHIVE_FORMAT_PATH})")
    if read(layout.ARCHIVE_FORMAT_PATH).decode(errors="replace") != layout.ARCHIVE_FORMAT_VALUE:
        raise CheckpointError(
            f"{path}: not a torch.export archive ({layout.ARCHIVE_FORMAT_PATH} is not {layout.ARCHIVE_FORMAT_VALUE!r})"
        )
    version = read(layout.ARCHIVE_VERSION_PATH).decode(errors="replace")
    if version != layout.ARCHIVE_VERSION_VALUE:
        raise CheckpointError(
            f"{path}: archive version {version!r}, this torch reads {layout.ARCHIVE_VERSION_VALUE!r}; save it again with this torch"
        )
    if parts.get("byteorder") and read("byteorder").decode(errors="replace") != "little":
        raise CheckpointError(f"{path}: its tensors are stored big-endian; save it on a little-endian machine")
    for name in parts:
        if name.startswith((layout.AOTINDUCTOR_DIR, layout.EXECUTORCH_DIR, layout.MTIA_DIR)):
            raise _refuse(path, f"holds compiled code ({name})")
    models = [n for n in parts if n.startswith(layout.MODELS_DIR)]
    if models != [layout.MODELS_FILENAME_FORMAT.format(MODEL)]:
        raise CheckpointError(
            f"{path}: holds the programs {', '.join(models) or 'none'}; rewrite reads archives of one program, "
            f"{layout.MODELS_FILENAME_FORMAT.format(MODEL)}, as torch.export.save writes them"
        )
    for legacy in (f"{layout.WEIGHTS_DIR}{MODEL}.pt", f"{layout.CONSTANTS_DIR}{MODEL}.pt"):
        if legacy in parts:
            raise _refuse(path, f"stores its tensors as one pickle ({legacy}, an old torch.export layout)")


def _json(path: Path, data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc}); is the file corrupt?") from exc


def _text(path: Path, data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: {name} is not UTF-8 text; is the file corrupt?") from exc


# -- tensors ----------------------------------------------------------------------------------


def _tensors(path: Path, read, directory: str, config_name: str) -> dict[str, torch.Tensor]:
    """The tensors a payload config names, built from their raw bytes; tensors that share a
    payload file share storage, as saved (tied weights stay tied)."""
    config = _json(path, read(config_name), config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: {config_name} has no 'config' mapping; is the file corrupt?")
    storages: dict[str, torch.Tensor] = {}
    tensors = {}
    for fqn, entry in entries.items():
        where = f"{config_name} entry {fqn!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise CheckpointError(f"{path}: {where} is malformed")
        if not _FQN.fullmatch(fqn):
            raise _refuse(path, f"{where}: the name is not a dotted Python name")
        file = entry["path_name"]
        if entry.get("use_pickle"):
            raise _refuse(path, f"{where} is stored as a pickle ({directory}{file})")
        if not file.startswith(
            layout.TENSOR_CONSTANT_FILENAME_PREFIX
            if directory == layout.CONSTANTS_DIR
            else layout.WEIGHT_FILENAME_PREFIX
        ):
            raise _refuse(path, f"{where} is a pickled Python object ({directory}{file}), not a tensor")
        try:
            meta = serde._dict_to_dataclass(schema.TensorMeta, entry.get("tensor_meta"))
            dtype = serde.deserialize_scalar_type(meta.dtype)
            device = serde.deserialize_device(meta.device)
            size = serde.deserialize_size(meta.sizes)
            stride = serde.deserialize_stride(meta.strides)
            offset = serde.deserialize_storage_offset(meta.storage_offset)
        except Exception as exc:
            raise CheckpointError(f"{path}: {where} has a malformed tensor_meta ({exc})") from exc
        if file not in storages:
            storages[file] = _flat(path, read(directory + file), dtype, where)
        flat = storages[file]
        if flat.dtype != dtype:
            raise CheckpointError(
                f"{path}: {where}: {file} is read as both {flat.dtype} and {dtype}; is the file corrupt?"
            )
        if any(s < 0 for s in (*size, *stride, offset)) or (
            all(s > 0 for s in size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= max(flat.numel(), 1)
        ):
            raise CheckpointError(
                f"{path}: {where}: sizes {size}, strides {stride} reach past the {flat.numel()} values stored"
            )
        if device.type not in ("cpu", "cuda"):
            raise CheckpointError(
                f"{path}: {where} is on the device {device}; rewrite loads tensors saved on cpu or cuda"
            )
        tensor = flat.as_strided(size, stride, offset) if flat.numel() else torch.zeros(size, dtype=dtype)
        try:
            tensor = tensor.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise CheckpointError(
                f"{path}: {where} was saved on {device}, which this machine cannot use ({exc})"
            ) from exc
        if entry.get("is_param"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(meta.requires_grad))
        elif meta.requires_grad:
            tensor.requires_grad_(True)
        tensors[fqn] = tensor
    return tensors


def _flat(path: Path, data: bytes, dtype: torch.dtype, where: str) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if len(data) % size:
        raise CheckpointError(
            f"{path}: {where}: {len(data)} bytes is not a whole number of {dtype} values; is the file corrupt?"
        )
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _sample_inputs(path: Path, data: bytes):
    if not data:
        return None
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise _refuse(
            path,
            f"its sample inputs ({layout.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL)}) hold pickled Python objects, or are corrupt",
        ) from exc
    if not (
        isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple) and isinstance(inputs[1], dict)
    ):
        raise CheckpointError(
            f"{path}: its sample inputs are not a pair (args tuple, kwargs dict); is the file corrupt?"
        )
    return inputs


# -- the program's text -----------------------------------------------------------------------

# Fields whose text torch writes into Python source or looks up as an attribute path.
_NAME_KEYS = {"name", "as_name", "user_input_name"}
_FQN_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "fqn"}
_NAME_MAPS = {"tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values"}


def check_program(path: Path, program: Any) -> None:
    """Raise CheckpointError unless every name, target, shape expression and guard of the
    serialized program is of the harmless kind torch.export writes."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise CheckpointError(f"{path}: its program has no graph_module; is the file corrupt?")
    for key in program.get("range_constraints") or {}:
        _check_expression(path, str(key))
    _walk(path, program)
    for guard in program.get("guards_code") or []:
        _check_guard(path, guard)


def _check(path: Path, ok, what: str) -> None:
    if not ok:
        raise _refuse(path, f"its program has {what}, which torch.export does not write")


def _walk(path: Path, value: Any, key: str = "") -> None:
    if isinstance(value, dict):
        if key == "metadata":
            for name, text in value.items():
                # fx prints some of these as comments of the generated source: no line breaks but \n.
                _check(
                    path,
                    isinstance(text, str) and "\r" not in text,
                    f"node metadata {name!r} that is not one-line-per-line text",
                )
            return
        if key in _NAME_MAPS:
            for name in value:
                _check(path, _identifier(name), f"a value named {name!r}")
        if key == "custom_obj_values" and value:
            raise _refuse(path, "its program uses script objects (custom_obj_values)")
        for k, v in value.items():
            _walk(path, v, k)
        if key == "inputs" and "as_string" in value:
            _check(
                path, re.fullmatch(r"[\w .,:/+-]*", str(value["as_string"])), f"a string input {value['as_string']!r}"
            )
        return
    if isinstance(value, list):
        for item in value:
            _walk(path, item, key)
        return
    if not isinstance(value, str):
        return
    if key in _NAME_KEYS or key in ("forward_arg_names", "field_names"):
        _check(path, _identifier(value), f"the name {value!r}")
    elif key in _FQN_KEYS:
        _check(path, _FQN.fullmatch(value), f"the attribute path {value!r}")
    elif key in ("target", "as_operator"):
        _check(path, _is_operator(value), f"the call target {value!r}")
    elif key in ("class_fqn", "custom_obj_name"):
        raise _refuse(path, f"its program uses the script object {value!r}")
    elif key == "expr_str":
        _check_expression(path, value)


def _identifier(name: Any) -> bool:
    return isinstance(name, str) and _IDENTIFIER.fullmatch(name) is not None and not keyword.iskeyword(name)


def _is_operator(target: str) -> bool:
    if _OP_TARGET.fullmatch(target):
        return True
    return target in {f"{op.__module__}.{op.__name__}" for op in serde._SYM_OPS} | {"_operator.getitem"}


def _check_expression(path: Path, text: str) -> None:
    """A symbolic size as torch writes it; sympify evaluates this text, so nothing else may appear."""
    _check(path, len(text) <= _MAX_TEXT, f"a shape expression of {len(text)} characters")
    position = 0
    while position < len(text.rstrip()):
        token = _EXPR_TOKEN.match(text, position)
        _check(path, token, f"the shape expression {text!r}")
        if token["symbol"] is not None:
            _check(
                path,
                _SYMBOL.fullmatch(token["symbol"]),
                f"the symbol {token['symbol']!r} in the shape expression {text!r}",
            )
        if token["name"] is not None:
            allowed = token["name"] in _EXPR_FUNCTIONS or _SYMBOL.fullmatch(token["name"])
            _check(path, allowed, f"the name {token['name']!r} in the shape expression {text!r}")
        position = token.end()


def _check_guard(path: Path, guard: Any) -> None:
    """A guard on the inputs' sizes, as torch.export writes them (``L['x'].size()[0] <= 64``):
    ``module()`` compiles these into a function, so only comparisons and arithmetic of numbers
    and of the inputs' sizes, strides and numels may appear."""
    try:
        tree = ast.parse(guard, mode="eval") if isinstance(guard, str) and len(guard) <= _MAX_TEXT else None
    except SyntaxError:
        tree = None
    # text only as the name of an input, L['x']: 'a' * 10**11 would fill the memory at every call
    names = (
        {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)}
        if tree
        else set()
    )
    harmless = tree is not None and all(_harmless_guard_node(n, names) for n in ast.walk(tree))
    _check(path, harmless, f"the input guard {guard!r}")


def _harmless_guard_node(node: ast.AST, input_names: set[int]) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "L" and isinstance(node.ctx, ast.Load)
    if isinstance(node, ast.Constant):  # numbers of a size, or the name of an input
        if isinstance(node.value, str):
            return id(node) in input_names and _IDENTIFIER.fullmatch(node.value) is not None
        return isinstance(node.value, (int, float, bool)) and abs(node.value) < 2**63
    if isinstance(node, ast.Attribute):
        return node.attr in _GUARD_CALLS
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and node.func.attr in _GUARD_CALLS and not node.keywords
    if isinstance(node, ast.operator):  # no powers: 2 ** 10**10 would run for ever at every call
        return isinstance(node, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div))
    return isinstance(
        node,
        (
            ast.Expression,
            ast.Compare,
            ast.BoolOp,
            ast.BinOp,
            ast.UnaryOp,
            ast.Subscript,
            ast.Load,
            ast.cmpop,
            ast.boolop,
            ast.unaryop,
        ),
    )
