"""Capture: nn.Module + example inputs -> ATen-level GraphModule through torch.export.

Non-strict export runs the model's Python as written, so anything the model does with
Python values is fixed at capture (branches on ``self.training`` included); the mode asked
for is the one recorded. When the model has code that reads ``.training`` (other than
dropout and batch norm, whose mode the graph records as flags), it is captured in the other
mode too, unless its ops traced on fake tensors in both modes are the same (a fifth of the
time or less): if that graph differs beyond those flags, ``Capture.fixed_mode`` says where,
and the rewritten module refuses to switch. The batch dimension (dim 0 of every tensor
input) is captured as dynamic where torch.export can keep it so
(``torch.export.Dim.AUTO``), so the returned module takes other batch sizes too.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.errors import CaptureError, RewriteError
from rewrite.graph import describe_value
from rewrite.module import first_mode_difference
from rewrite.state import buffers_kept, random_state_kept

_TORCH_DIR = os.path.dirname(torch.__file__)
_OUR_DIR = os.path.dirname(os.path.abspath(__file__))  # this package only: the user's code may sit beside it
_STDLIB_DIR = os.path.dirname(contextlib.__file__)
MODES = ("train", "eval")


@dataclass
class Capture:
    """What capture produced, and what it assumed."""

    graph_module: fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    mode: str
    dynamic_shapes: Any
    dynamic_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fixed_mode: str | None = None  # how the other mode's graph differs (None: only in what set_graph_mode switches)


def normalize_inputs(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if example_inputs is None:
        raise CaptureError("example_inputs is required: the inputs the model is called with, e.g. (x,)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of inputs, not {type(example_inputs).__name__}"
        )
    example_kwargs = dict(example_kwargs or {})
    return example_inputs, example_kwargs


def batch_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict):
    """{argument name: spec} marking dim 0 of every tensor as Dim.AUTO, or None when the
    forward signature cannot be bound to the inputs."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None

    def spec(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {0: torch.export.Dim.AUTO}
        return None

    shapes = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(spec, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            shapes[name] = pytree.tree_map(spec, value)
    return shapes


@contextlib.contextmanager
def quiet():
    """torch.export logs and prints partial graphs while failing; the user gets our message."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo", "torch.fx", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_library_file(path: str) -> bool:
    """torch's, ours, or the standard library's; not the packages installed under the standard
    library's folder (site-packages), where the user's model may come from."""
    if path.startswith((_TORCH_DIR + os.sep, _OUR_DIR + os.sep)):
        return True
    installed = {"site-packages", "dist-packages"} & set(path.split(os.sep))
    return path.startswith(_STDLIB_DIR + os.sep) and not installed


def user_frame(exc: BaseException) -> str:
    """'file.py:42: code' of the innermost frame of the user's code in the traceback, or ''."""
    found = ""
    while exc is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            path = os.path.abspath(frame.filename)
            if _is_library_file(path) or frame.filename.startswith("<"):
                continue
            found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
        exc = exc.__cause__ or exc.__context__
    return found


def _short_message(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hint(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc)
    if "data-dependent" in text or "DataDependent" in name:
        return (
            "The model branches on the values of a tensor (data-dependent control flow), which a graph "
            "cannot record; compute the condition outside forward, or use torch.cond."
        )
    if re.search(r"cache_utils\.\w*Cache\b|\bDynamicCache\b", text) or "Cache" in name:
        return (
            "A Hugging Face model with use_cache=True returns its key/value cache (DynamicCache, or "
            "EncoderDecoderCache for T5 and other encoder-decoders): build it with use_cache=False, or pass "
            "use_cache=False among the call's keyword arguments."
        )
    if "Unsupported" in name:
        return "torch.export does not support a Python construct the model uses."
    return "torch.export could not trace the model."


def export_failure(exc: BaseException, what: str) -> CaptureError:
    """One CaptureError for a torch.export failure: ``what`` failed, why (shortened), where in
    the user's code, and what to do."""
    where = user_frame(exc)
    return CaptureError(f"{what}: {_short_message(exc)}" + (f" (at {where})" if where else "") + f". {_hint(exc)}")


@contextlib.contextmanager
def in_mode(model: torch.nn.Module, training: bool):
    """``model`` in train or eval mode inside the block; every module's flag as it was after."""
    was_training = {m: m.training for m in model.modules()}
    try:
        model.train(training)
        yield
    finally:
        # Modules that do more in train() than set the flag (a RewrittenModule flips the flags
        # in its graph) get train() called again; then every flag is set back as it was.
        for m, flag in was_training.items():
            if type(m).train is not torch.nn.Module.train:
                m.train(flag)
        for m, flag in was_training.items():
            m.training = flag


def model_failure(model: torch.nn.Module, exc: BaseException, args: tuple, kwargs: dict) -> CaptureError:
    """The error for a model that fails on its example inputs when it runs as it is."""
    inputs = ", ".join(describe_value(t) or type(t).__name__ for t in pytree.tree_leaves((args, kwargs)))
    where = user_frame(exc)
    return CaptureError(
        f"{type(model).__name__} itself fails on the example inputs ({inputs}): {type(exc).__name__}: "
        f"{_short_message(exc)}" + (f" (at {where})" if where else "") + "; give inputs the model accepts (shape and dtype)"
    )


def _eager_failure(model: torch.nn.Module, args: tuple, kwargs: dict, training: bool) -> Exception | None:
    """What the model raises when called on the inputs as it is (None: it runs); its buffers and
    the random state are left as they were."""
    try:
        with in_mode(model, training), buffers_kept(model), torch.no_grad(), random_state_kept(), quiet():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is what we report
        return exc
    return None


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes, training: bool) -> fx.GraphModule:
    with in_mode(model, training), quiet():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False).module()


# Classes whose use of .training is no Python branch on the mode: nn.Module's train() and
# GraphModule's copy of the flag; dropout and batch norm, whose mode the graph records as
# flags that set_graph_mode switches.
_NO_MODE_BRANCH = {torch.nn.Module, object, fx.GraphModule}
_MODE_AS_FLAGS = ("torch.nn.modules.dropout", "torch.nn.modules.batchnorm")


def _names(code: types.CodeType) -> set[str]:
    """Attribute and global names a function's code uses, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _reads_mode(cls: type) -> bool:
    """Whether code of ``cls`` or of its base classes uses ``.training``, beyond what the graph
    records as flags: a Python branch on the mode, which capture fixes."""
    for klass in cls.__mro__:
        if klass in _NO_MODE_BRANCH or klass.__module__ in _MODE_AS_FLAGS:
            continue
        for value in vars(klass).values():
            function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            code = getattr(function, "__code__", None)
            if code is not None and "training" in _names(code):
                return True
    return False


class _OpTrace(TorchDispatchMode):
    """The ops a forward runs, each with its arguments and results, tensors named by when they
    were first seen (so that two traces compare by what reads what), and the grad mode. Ops
    that return no tensor (size and device queries) are left out: what they decide shows in
    the ops that follow."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self._names: dict[int, int] = {}
        self._seen: list = []  # every tensor named, kept alive so that no id is reused

    def name(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in self._names:
            self._names[id(value)] = len(self._names)
            self._seen.append(value)
        return ("tensor", self._names[id(value)], tuple(value.shape), value.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(out)):
            inputs, outputs = pytree.tree_map(self.name, (args, kwargs)), pytree.tree_map(self.name, out)
            self.ops.append((func, inputs, torch.is_grad_enabled(), outputs))
        return out


def _fake_trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The forward's ops (``_OpTrace``) on fake tensors, and its outputs' structure."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, fake.from_tensor, (args, kwargs))
        with _OpTrace() as trace:
            out = model(*fake_args, **fake_kwargs)
        leaves, spec = pytree.tree_flatten(out)
        return trace.ops, str(spec), [trace.name(leaf) for leaf in leaves]


def _runs_alike_in_both_modes(model: torch.nn.Module, args: tuple, kwargs: dict, training: bool) -> bool:
    """Whether the model runs the same ops on the same tensors, to the same outputs, with every
    module in ``training`` mode and with every one but dropout and batch norm (which the graph
    records as flags) in the other: then no Python branch on the mode changes the graph. On
    fake tensors, in a fifth of the time of an export or less. False where unsure (the traces
    differ, or one fails)."""
    try:
        with in_mode(model, training), buffers_kept(model), random_state_kept(), quiet():
            captured = _fake_trace(model, args, kwargs)
            model.train(not training)  # as the export of the other mode would (modules may do more than set the flag)
            for m in model.modules():
                if type(m).__module__ in _MODE_AS_FLAGS:
                    m.training = training
            other = _fake_trace(model, args, kwargs)
    except Exception:  # noqa: BLE001 - a trace that fails only means the export must tell
        return False
    return captured == other


def _other_mode_difference(
    model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes, mode: str, graph_module: fx.GraphModule
) -> str | None:
    """How the graph of the other mode differs from ``graph_module`` beyond the train/eval
    flags, or None. Only models with code that reads the mode are looked at, and only those
    whose ops change with the mode (``_runs_alike_in_both_modes``) are captured again (it costs
    a second export)."""
    if not any(_reads_mode(cls) for cls in {type(m) for m in model.modules()}):
        return None
    if _runs_alike_in_both_modes(model, args, kwargs, mode == "train"):
        return None
    other = "eval" if mode == "train" else "train"
    try:
        other_graph = _export(model, args, kwargs, dynamic_shapes, other == "train")
    except Exception as exc:  # noqa: BLE001 - a mode the model cannot be captured in cannot be switched to
        return f"it cannot be captured in {other} mode ({_short_message(exc)})"
    where = first_mode_difference(graph_module, other_graph, other == "train")
    return f"in {other} mode its Python computes another graph (first difference {where})" if where else None


def capture(
    model: torch.nn.Module,
    example_inputs,
    example_kwargs: dict | None = None,
    *,
    mode: str | None = None,
    dynamic_batch: bool = True,
) -> Capture:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)`` in ``mode``
    ("train" or "eval"; default: the model's current mode). The model is left as it was."""
    import time

    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    if mode is None:
        mode = "train" if model.training else "eval"
    if mode not in MODES:
        raise CaptureError(f"mode must be 'train' or 'eval', not {mode!r}")
    dynamic_shapes = batch_dynamic_shapes(model, args, kwargs) if dynamic_batch else None
    notes = []

    start = time.perf_counter()
    try:
        graph_module = _export(model, args, kwargs, dynamic_shapes, mode == "train")
    except RewriteError:
        raise
    except Exception as exc:
        own = _eager_failure(model, args, kwargs, mode == "train")
        if own is not None:  # not torch.export's doing: the model itself cannot take these inputs
            raise model_failure(model, own, args, kwargs) from own
        raise export_failure(exc, f"cannot capture {type(model).__name__}") from exc
    fixed_mode = _other_mode_difference(model, args, kwargs, dynamic_shapes, mode, graph_module)
    if fixed_mode:
        other = "eval" if mode == "train" else "train"
        notes.append(
            f"{fixed_mode}: the result stays in {mode} mode (.{other}() raises); "
            f"optimize(model, ..., mode={other!r}) rewrites it in {other} mode"
        )

    dynamic_inputs = []
    for node in graph_module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        # a SymInt can be specialised to a constant (a guard in the model fixed the size): not dynamic
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and not is_concrete_int(val.shape[0]):
            dynamic_inputs.append(node.name)
    if dynamic_batch and dynamic_shapes is not None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
        if len(dynamic_inputs) < len(tensors):
            notes.append(
                "the batch size of some inputs is static: the model fixes it, or the example batch is 1 "
                "(torch.export specialises size 1; give at least 2 for a dynamic batch)"
            )
    return Capture(
        graph_module=graph_module,
        example_args=args,
        example_kwargs=kwargs,
        mode=mode,
        dynamic_shapes=dynamic_shapes,
        dynamic_inputs=dynamic_inputs,
        notes=notes,
        seconds=time.perf_counter() - start,
        fixed_mode=fixed_mode,
    )
