"""Where the custom ops get their kernels: the PyTorch reference or codegen's Triton kernels.

CUDA tensors use the Triton kernels when Triton is importable. ``use_triton_on_cpu()``
routes CPU tensors through the same kernels under Triton's interpreter (``TRITON_INTERPRET=1``
must be set before the kernels are first used): slow, but it runs the exact GPU code path on
a machine without a GPU, which is how the tests check it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

_triton_on_cpu = False


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def wants_triton(t: torch.Tensor) -> bool:
    """Whether ``t`` goes to the Triton kernels. They compute in float32, so float64 stays on
    the reference, which is exact for it."""
    if t.dtype == torch.float64:
        return False
    if t.device.type == "cuda":
        return triton_available()
    return _triton_on_cpu and t.device.type == "cpu"


@contextlib.contextmanager
def use_triton_on_cpu(enabled: bool = True):
    """Run the ops' Triton kernels on CPU tensors (needs ``TRITON_INTERPRET=1``)."""
    global _triton_on_cpu
    if enabled and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("use_triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous
