"""Where kernels run, and launch helpers shared by the kernels.

CUDA tensors use the Triton kernels when Triton is importable. ``use_triton_on_cpu()``
routes CPU tensors through the same kernels under Triton's interpreter (``TRITON_INTERPRET=1``
must be set before triton is first imported): slow, but it runs the exact GPU code path on a
machine without a GPU, which is how the tests check it. Everywhere else the ops run their
PyTorch reference.

Nothing here imports triton at import time, so the op library loads without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os

import torch

# Elementwise templates move bytes, not arithmetic: 1024 elements a program keeps enough loads
# in flight on a GPU without spilling registers, and keeps the number of programs small under
# the CPU interpreter (which runs one program at a time).
ELEMENTWISE_BLOCK = 1024

_triton_on_cpu = False


@functools.cache
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether an op given ``t`` launches its Triton kernel (else it runs the reference).

    Fake tensors (export, compile) take the kernel path only with real Triton, where
    ``wrap_triton`` records the launch; the interpreter would try to run on them.
    """
    if t.device.type == "cuda":
        return triton_available()
    if t.device.type != "cpu" or not _triton_on_cpu:
        return False
    return not torch._subclasses.fake_tensor.is_fake(t)


def wants_triton(t: torch.Tensor) -> bool:
    """For the template ops, which compute in float32: float64 stays on the reference (exact
    for it), and so does bfloat16 under the interpreter, which has no bfloat16 (numpy lacks
    it). Pointwise regions instead refuse bfloat16 there with an error."""
    if t.dtype == torch.float64 or (t.dtype == torch.bfloat16 and interpreted()):
        return False
    return kernels_enabled(t)


@contextlib.contextmanager
def use_triton_on_cpu(enabled: bool = True):
    """Run the ops' Triton kernels on CPU tensors (needs ``TRITON_INTERPRET=1``)."""
    global _triton_on_cpu
    if enabled and not interpreted():
        raise RuntimeError("use_triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous


@contextlib.contextmanager
def quiet_op_registration():
    """Defining a ``triton_op`` without Triton installed logs a warning per op; the ops work
    without it (they run their reference), so say nothing."""
    logger = logging.getLogger("torch._library.triton")
    previous = logger.level
    if not triton_available():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def elementwise_grid(n: int, block: int = ELEMENTWISE_BLOCK) -> tuple[int]:
    return (-(-n // block),)


def on_device(t: torch.Tensor):
    """Launch on the GPU that holds ``t`` (not the current one); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
