"""Triton kernels of the 2-bit step activations (ReGELU2 / ReSiLU2), GPU path of
``torch.ops.rewrite.regelu2 / resilu2 / step2_backward``.

The forward reads x once and writes the activation and the packed codes in the same pass;
the backward reads the codes and grad_out and writes grad_in. Both view the flat tensor as
groups of four elements, one byte of codes per group. The PyTorch reference they must equal
is ``rewrite.ops.step_activation`` (pack2 / unpack2 / step_codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codegen.launch import ELEMENTWISE_BLOCK, elementwise_grid, on_device

_ACTIVATIONS = {"regelu2": 0, "resilu2": 1}
_SQRT1_2 = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _step2_forward_kernel(
    x_ptr,
    y_ptr,
    codes_ptr,
    n,
    c0,
    c1,
    c2,
    ACTIVATION: tl.constexpr,  # 0: GELU, 1: SiLU
    TANH: tl.constexpr,  # GELU's tanh form
    BLOCK: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may pass 2**31 elements
    group = pid * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, 4)
    offsets = group[:, None] * 4 + lane[None, :]
    mask = offsets < n
    x_raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    if ACTIVATION == 0:
        if TANH:
            # tanh(u) = 2 sigmoid(2u) - 1; |u| > 15 gives +-1 in float32, and clamping keeps exp finite.
            inner = tl.minimum(tl.maximum(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x), -15.0), 15.0)
            y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        else:
            y = 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))
    else:
        y = x * tl.sigmoid(x)
    tl.store(y_ptr + offsets, y.to(x_raw.dtype), mask=mask)
    code = (x > c0).to(tl.int32) + (x > c1).to(tl.int32) + (x > c2).to(tl.int32)
    code = tl.where(mask, code, 0)
    packed = tl.sum(code << (lane[None, :] * 2), axis=1)
    tl.store(codes_ptr + group, packed.to(tl.uint8), mask=group < (n + 3) // 4)


@triton.jit
def _step2_backward_kernel(
    grad_ptr,
    codes_ptr,
    out_ptr,
    n,
    s1,
    s2,
    s3,
    BLOCK: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may pass 2**31 elements
    group = pid * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, 4)
    offsets = group[:, None] * 4 + lane[None, :]
    mask = offsets < n
    packed = tl.load(codes_ptr + group, mask=group < (n + 3) // 4, other=0).to(tl.int32)
    code = (packed[:, None] >> (lane[None, :] * 2)) & 3
    slope = tl.where(code == 0, 0.0, tl.where(code == 1, s1, tl.where(code == 2, s2, s3)))
    g_raw = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, (g_raw.to(tl.float32) * slope).to(g_raw.dtype), mask=mask)


def step2_forward(x: torch.Tensor, activation: str, approximate: str, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation(x), packed codes) in one pass over x."""
    x = x.contiguous()
    n = x.numel()
    y = torch.empty_like(x)
    codes = torch.empty(((n + 3) // 4,), dtype=torch.uint8, device=x.device)
    if n:
        c0, c1, c2 = (float(c) for c in thresholds)
        with on_device(x):
            _step2_forward_kernel[elementwise_grid(n)](
                x, y, codes, n, c0, c1, c2,
                ACTIVATION=_ACTIVATIONS[activation], TANH=approximate == "tanh", BLOCK=ELEMENTWISE_BLOCK,
            )  # fmt: skip
    return y, codes


def step2_backward(grad_out: torch.Tensor, codes: torch.Tensor, slopes) -> torch.Tensor:
    """grad_out * slopes[code] with the codes unpacked on the fly."""
    grad_out = grad_out.contiguous()
    n = grad_out.numel()
    out = torch.empty_like(grad_out)
    if n:
        _, s1, s2, s3 = (float(s) for s in slopes)
        with on_device(grad_out):
            _step2_backward_kernel[elementwise_grid(n)](grad_out, codes, out, n, s1, s2, s3, BLOCK=ELEMENTWISE_BLOCK)
    return out
