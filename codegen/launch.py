"""Launch helpers shared by the kernels: block sizes from a simple heuristic, grids.

Elementwise kernels move bytes, not arithmetic: 1024 elements a program keeps enough loads in
flight on a GPU without spilling registers, and keeps the number of programs small under the
CPU interpreter (which runs one program at a time).
"""

from __future__ import annotations

import contextlib

import torch
import triton

ELEMENTWISE_BLOCK = 1024


def elementwise_grid(n: int, block: int = ELEMENTWISE_BLOCK) -> tuple[int]:
    return (triton.cdiv(n, block),)


def on_device(t: torch.Tensor):
    """Launch on the GPU that holds ``t`` (not the current one); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
