"""Memory, measured: the activations autograd saves, and the peak of the storages a function
holds at once.

Activations are the bytes of the distinct storages autograd saves for the backward, recorded
with ``torch.autograd.graph.saved_tensors_hooks``. A storage saved twice (a norm's output
that the next linear also saves) counts once, for the node that saved it first. Parameters
and buffers are not activations and are left out, and so are tensors computed from them
alone (the bf16 copies of the weights autocast makes).

The peak (``measure_peak``) is what ``rewrite.liveness.liveness_profile`` simulates: on CPU
the bytes of the storages ops create while the function runs, each counted until it dies;
on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.graph import module_path


@dataclass
class SavedActivations:
    """Bytes autograd saved during one forward, in total and per source."""

    total_bytes: int = 0
    by_source: dict[str, int] = field(default_factory=dict)  # node name (or "?") -> bytes

    def by_module(self, graph: fx.Graph) -> dict[str, int]:
        """Bytes per module path ('' is the root), in graph order."""
        paths = {n.name: module_path(n) or "(top)" for n in graph.nodes}
        grouped: dict[str, int] = defaultdict(int)
        for node in graph.nodes:
            if node.name in self.by_source:
                grouped[paths[node.name]] += self.by_source[node.name]
        return dict(grouped)


class _SavedRecorder:
    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: set[int] = set()
        self.result = SavedActivations()
        self.source = "?"

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            nbytes = storage.nbytes()
            self.result.total_bytes += nbytes
            self.result.by_source[self.source] = self.result.by_source.get(self.source, 0) + nbytes
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _state_pointers(module: torch.nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


class _ParameterCopies(TorchDispatchMode):
    """Adds to ``pointers`` (storages of parameters and buffers) the storages of tensors
    computed from those alone, for as long as those tensors live."""

    def __init__(self, pointers: set[int]):
        super().__init__()
        self.pointers = pointers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(t.untyped_storage().data_ptr() in self.pointers for t in inputs):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage().data_ptr()
                    if key not in self.pointers:
                        self.pointers.add(key)
                        weakref.finalize(t, self.pointers.discard, key)
        return out


@contextmanager
def _recording(module: torch.nn.Module):
    recorder = _SavedRecorder(_state_pointers(module))
    with _ParameterCopies(recorder.exclude), torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
        yield recorder


@contextmanager
def record_saved(module: torch.nn.Module):
    """Record what autograd saves inside the block (any callable, not only graphs)."""
    with _recording(module) as recorder:
        yield recorder.result


class _AttributingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, recorder: _SavedRecorder, keep: Collection[str]):
        super().__init__(gm)
        self.recorder = recorder
        self.keep = keep
        self.kept: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.recorder.source = n.name
        value = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = value
        return value


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call ``gm(*args, **kwargs)``."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return [*args, *kwargs.values()]
    return fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec)


def run_recording_saved(
    gm: fx.GraphModule, args: tuple, kwargs: dict, keep: Collection[str] = ()
) -> tuple[Any, SavedActivations, dict[str, Any]]:
    """Run ``gm`` once, attributing every storage autograd saves to the node that saved it;
    also returns the values of the nodes named in ``keep``."""
    with _recording(gm) as recorder:
        interpreter = _AttributingInterpreter(gm, recorder, keep)
        out = interpreter.run(*flatten_inputs(gm, args, kwargs))
    return out, recorder.result, interpreter.kept  # Interpreter.run gives the outputs as the model returns them


class _LiveStorage(TorchDispatchMode):
    """Counts the bytes of storages created by ops while active, until each storage dies."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta"
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, FakeTensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                # a view of an input (or of a tensor that existed before) is not an allocation
                if key and key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    nbytes = storage.nbytes()
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes of the tensors ``fn`` allocates and holds at once (its intermediates; what
    existed before, such as parameters and inputs, is not counted). On CUDA this is
    ``max_memory_allocated`` above the memory in use when ``fn`` starts."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tracker = _LiveStorage()
    with tracker:
        fn()
    return tracker.peak
