"""Saving and loading: rewritten modules as ``.pt2`` (torch.export), checkpoints read without
running pickled code (``torch.load(weights_only=True)``, safetensors, ``torch.export.load``).
Every file is written to a temporary name and renamed into place, so a failure never leaves
a half-written file or touches an existing one."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import pickletools
import re
import signal
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from rewrite.archive import read_program
from rewrite.capture import batch_dynamic_shapes, export_failure, quiet
from rewrite.errors import CheckpointError
from rewrite.graph import describe_value
from rewrite.module import RewriteInfo, RewrittenModule

REPORT_FILE = "rewrite_report.json"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


_TEMPORARY = ".rewrite-tmp"  # .NAME.PID.rewrite-tmp, beside the file it becomes


def atomic_write(files: Mapping[str | os.PathLike, bytes | memoryview | str]) -> list[Path]:
    """Write each file through a temporary file in its folder, then rename them all into place:
    a failure (an error, a full disk, Ctrl-C, SIGTERM) leaves no partial file and no existing
    file changed. Files get the permissions the umask gives, as any file the user writes.
    Temporary files that a killed run left behind are removed by the next write to that name."""
    temporaries = {}
    try:
        with _cleanup_on_signals():
            for path, data in files.items():
                path = Path(path)
                if path.is_dir():
                    raise CheckpointError(f"{path}: is a folder; give a file name")
                _remove_stale_temporaries(path)
                temporaries[path] = tmp = path.with_name(f".{path.name}.{os.getpid()}{_TEMPORARY}")
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data.encode("utf-8") if isinstance(data, str) else data)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as exc:
                    raise CheckpointError(f"{path}: cannot write it: {exc.strerror or exc}") from exc
            for path, tmp in temporaries.items():
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise CheckpointError(f"{path}: cannot write it: {exc.strerror or exc}") from exc
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
    return list(temporaries)


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_TEMPORARY}"):
        pid = tmp.name[len(path.name) + 2 : -len(_TEMPORARY)]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _cleanup_on_signals():
    """SIGTERM and SIGHUP end the process through Python (SystemExit), so that the cleanup of
    temporary files runs; signals can only be handled in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def export(module: torch.nn.Module, example_args=None, example_kwargs=None, dynamic_shapes=None):
    """The module as an ExportedProgram (re-captured with the example inputs it was made with)."""
    if isinstance(module, RewrittenModule):
        info = module.rewrite_info
        example_args = info.example_args if example_args is None else example_args
        example_kwargs = info.example_kwargs if example_kwargs is None else example_kwargs
        dynamic_shapes = info.dynamic_shapes if dynamic_shapes is None else dynamic_shapes
    if example_args is None:
        raise CheckpointError("saving needs example inputs: pass example_args (the module is not a rewritten one)")
    try:
        with quiet():
            return torch.export.export(
                module, tuple(example_args), dict(example_kwargs or {}), dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as exc:
        raise export_failure(exc, f"cannot export {type(module).__name__} to save it") from exc


def program_bytes(module: torch.nn.Module, *, example_args=None, example_kwargs=None) -> memoryview:
    """The ``.pt2`` archive of ``module``, in memory (its report goes inside, as rewrite_report.json).
    In memory first: torch's archive writer aborts the whole process when the disk is full."""
    program = export(module, example_args, example_kwargs)
    report = getattr(module, "report", None)
    extra = {REPORT_FILE: json.dumps(report.to_dict() if hasattr(report, "to_dict") else report)} if report else {}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    return buffer.getbuffer()


def save(module: torch.nn.Module, path: str | os.PathLike, *, example_args=None, example_kwargs=None) -> Path:
    """Save ``module`` as a ``.pt2`` file (its report goes inside, as rewrite_report.json)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise CheckpointError(f"{path}: a rewritten module is saved as .pt2; give a file name ending in .pt2")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the folder {path.parent} does not exist")
    return atomic_write({path: program_bytes(module, example_args=example_args, example_kwargs=example_kwargs)})[0]


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")


def load_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict | None]:
    """The ExportedProgram in a ``.pt2`` file and the rewrite report saved with it (or None)."""
    path = Path(path)
    _require_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .pt2 archive (torch.export.save writes a zip file); is it corrupt?")
    logged = _LoggedErrors()
    try:
        with quiet(), logged.attached("torch._export.serde"):
            program, extra = read_program(path)
    except CheckpointError:
        raise
    except Exception as exc:
        # torch's deserializer logs the real reason (e.g. an unregistered custom op) and raises a generic error.
        reasons = [e for error in (*logged.errors, exc) for e in _chain(error)]
        missing = next((m for e in reasons if (m := re.search(r"failed to resolve (torch\.ops\.[\w.]+)", str(e)))), None)
        if missing and missing.group(1).startswith(("torch.ops.aten.", "torch.ops.prims.")):
            raise CheckpointError(
                f"{path}: uses {missing.group(1)}, which this torch ({torch.__version__}) does not have; "
                "save it again with this torch"
            ) from exc
        if missing:
            raise CheckpointError(
                f"{path}: uses the custom op {missing.group(1)}, which is not registered; import the package "
                "that defines it before loading"
            ) from exc
        first = reasons[0]
        message = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        message = message if len(message) <= 300 else message[:299] + "…"  # torch's can hold a whole node
        raise CheckpointError(f"{path}: cannot load this .pt2: {message}") from exc
    return program, _saved_report(path, extra.get(REPORT_FILE))


def _saved_report(path: Path, text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its saved report ({REPORT_FILE}) is not valid JSON ({exc})") from exc
    passes = report.get("passes") if isinstance(report, dict) else None
    if not isinstance(passes, list) or not all(isinstance(p, dict) for p in passes):
        raise CheckpointError(f"{path}: its saved report ({REPORT_FILE}) is not a rewrite report (an object with 'passes')")
    return report


class _LoggedErrors(logging.Handler):
    """Keeps the exceptions a logger reports (with exc_info) while attached, printing nothing."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    @contextlib.contextmanager
    def attached(self, name: str):
        logger = logging.getLogger(name)
        level, propagate, handlers = logger.level, logger.propagate, logger.handlers
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.handlers = [self]  # torch's own handler would print the traceback
        try:
            yield self
        finally:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, innermost last."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def load(path: str | os.PathLike) -> RewrittenModule:
    """Load a ``.pt2`` written by ``save`` (or any torch.export program) as a module that is
    called, trained and switched between train/eval like the one saved."""
    program, report = load_program(path)
    args, kwargs = getattr(program, "example_inputs", None) or ((), {})
    if args or kwargs:
        mismatch = inputs_mismatch(program, args, kwargs)
        if mismatch:
            raise CheckpointError(f"{path}: its saved example inputs do not fit its program: {mismatch}; is the file corrupt?")
    module = program.module()
    # Dim.AUTO on the batch: saving the loaded module again keeps a dynamic batch dynamic (and a static one static).
    dynamic_shapes = batch_dynamic_shapes(module, args, kwargs) if args or kwargs else None
    report = report or {}
    info = RewriteInfo(
        model_name=report.get("model", "ExportedProgram"),
        mode=report.get("mode", "train" if module.training else "eval"),
        before=None,
        report=report or None,
        example_args=args,
        example_kwargs=kwargs,
        dynamic_shapes=dynamic_shapes,
    )
    return RewrittenModule(module, info)


def inputs_mismatch(
    program: torch.export.ExportedProgram | torch.fx.GraphModule, args: tuple, kwargs: dict
) -> str | None:
    """Why ``args``/``kwargs`` cannot be the inputs of ``program`` (or of the module loaded from
    one): their structure, or a tensor's dtype, rank or a fixed size. None when they fit."""
    if isinstance(program, torch.export.ExportedProgram):
        in_spec = program.call_spec.in_spec
        nodes = {n.name: n for n in program.graph.nodes}
        placeholders = [nodes[name] for name in program.graph_signature.user_inputs]
    else:
        info = getattr(program.graph._codegen, "pytree_info", None)
        in_spec = info.in_spec if info is not None else None
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    if in_spec is None:
        return None
    args_spec, kwargs_spec = in_spec.children() if hasattr(in_spec, "children") else in_spec.children_specs
    expected_args = args_spec.num_children
    expected_kwargs = list(kwargs_spec.context or [])
    if len(args) != expected_args or sorted(kwargs) != sorted(expected_kwargs):
        given = f"{len(args)} positional" + (f" and keywords {', '.join(sorted(kwargs))}" if kwargs else "")
        wanted = f"{expected_args} positional" + (f" and keywords {', '.join(expected_kwargs)}" if expected_kwargs else "")
        return f"{given} inputs given, the program takes {wanted}"
    leaves, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in expected_kwargs}))
    if spec != in_spec:
        return "the inputs are nested differently from the program's"
    for i, (node, value) in enumerate(zip(placeholders, leaves)):
        wanted = node.meta.get("val")
        if isinstance(wanted, torch.Tensor):
            fits = (
                isinstance(value, torch.Tensor)
                and value.dtype == wanted.dtype
                and value.dim() == wanted.dim()
                and all(not isinstance(w, int) or w == v for w, v in zip(wanted.shape, value.shape))
            )
            if not fits:
                return f"input {node.name} is {describe_value(value) or type(value).__name__}, the program takes {describe_value(wanted)}"
    return None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth``/``.bin`` (weights only: pickled objects are refused,
    never run) or ``.safetensors``."""
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid .safetensors file ({exc})") from exc
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; rewrite reads .pt2, {', '.join(STATE_DICT_SUFFIXES)}"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if _holds_a_pickle(path):
            raise CheckpointError(
                f"{path}: holds pickled Python objects, which rewrite refuses to load (loading them runs "
                "their code); save a state dict instead: torch.save(model.state_dict(), path), or use .safetensors"
            ) from exc
        # Not a pickle at all (random or truncated bytes); torch's text would suggest weights_only=False.
        text = str(exc)
        unpickler = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        first = unpickler.group(1) if unpickler else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
        if "weights_only" in first:
            first = type(exc).__name__
        raise CheckpointError(f"{path}: not a valid PyTorch checkpoint ({first}); is it corrupt?") from exc
    return _as_state_dict(path, state)


def _holds_a_pickle(path: Path) -> bool:
    """Whether the file (or the data.pkl inside torch's zip format) is a well-formed pickle, so
    that the weights-only reader refused its content rather than choked on corrupt bytes.
    pickletools only decodes the opcodes; nothing is run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def _is_tensor_mapping(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _as_state_dict(path: Path, state) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping) and not state:
        return {}  # as an empty .safetensors reads
    if _is_tensor_mapping(state):
        return dict(state)
    if isinstance(state, Mapping):
        for key in _NESTED_STATE_KEYS:
            if _is_tensor_mapping(state.get(key)):
                return dict(state[key])
        keys = ", ".join(map(str, list(state)[:8]))
        raise CheckpointError(
            f"{path}: not a state dict (a mapping of names to tensors); its top-level keys are: {keys}"
        )
    raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)")
