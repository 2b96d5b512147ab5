"""A polynomial activation with its own coefficients per channel (for ReLU replacement).

    torch.ops.rewrite.row_polynomial(x, coeffs, dim) -> y
    torch.ops.rewrite.row_polynomial_backward(grad_y, x, coeffs, dim) -> (grad_x, grad_coeffs)

``coeffs`` is [C, K+1] with C = x.shape[dim]: y = sum_k coeffs[c, k] * x^k for the elements of
channel c. On the kernel path x is viewed as rows (everything up to ``dim``) of N elements
(everything after it), one program per row, through codegen's row template; the backward's
coefficient gradients are per-row sums, added up over the rows of each channel.
"""

from __future__ import annotations

import math

import torch

from codegen import launch as kernels


def _rows(x: torch.Tensor, coeffs: torch.Tensor, dim: int):
    dim = dim % x.dim()
    rows = math.prod(x.shape[: dim + 1])
    per_row = coeffs.repeat(rows // coeffs.shape[0], 1) if rows else coeffs[:0]
    return rows, x.numel() // rows if rows else 0, [per_row[:, k].contiguous() for k in range(coeffs.shape[1])]


def _broadcast_coeff(coeffs: torch.Tensor, k: int, x: torch.Tensor, dim: int) -> torch.Tensor:
    dim = dim % x.dim()
    return coeffs[:, k].reshape(coeffs.shape[0], *([1] * (x.dim() - dim - 1)))


def _check(x: torch.Tensor, coeffs: torch.Tensor, dim: int) -> None:
    if coeffs.dim() != 2 or coeffs.shape[0] != x.shape[dim]:
        raise ValueError(
            f"row_polynomial: coeffs must be [C, degree+1] with C = x.shape[{dim}] = {x.shape[dim]}, "
            f"got {list(coeffs.shape)}"
        )


@torch.library.triton_op("rewrite::row_polynomial", mutates_args=())
def row_polynomial(x: torch.Tensor, coeffs: torch.Tensor, dim: int) -> torch.Tensor:
    _check(x, coeffs, dim)
    if kernels.wants_triton(x) and x.numel():
        from codegen.templates import row_polynomial_kernels

        rows, n, per_row = _rows(x, coeffs, dim)
        (y,), _ = row_polynomial_kernels(coeffs.shape[1] - 1)[0]([x.reshape(rows, n)], per_row)
        return y.view(x.shape)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = torch.zeros_like(xf) + _broadcast_coeff(coeffs, coeffs.shape[1] - 1, x, dim).to(acc)
    for k in range(coeffs.shape[1] - 2, -1, -1):
        y = y * xf + _broadcast_coeff(coeffs, k, x, dim).to(acc)
    return y.to(x.dtype).contiguous()


@torch.library.triton_op("rewrite::row_polynomial_backward", mutates_args=())
def row_polynomial_backward(
    grad_y: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    degree = coeffs.shape[1] - 1
    if kernels.wants_triton(x) and x.numel():
        from codegen.templates import row_polynomial_kernels

        rows, n, per_row = _rows(x, coeffs, dim)
        (dx,), row_grads = row_polynomial_kernels(degree)[1]([x.reshape(rows, n), grad_y.reshape(rows, n)], per_row)
        dcoeffs = torch.stack(row_grads, dim=1).view(rows // coeffs.shape[0], coeffs.shape[0], degree + 1).sum(0)
        return dx.view(x.shape), dcoeffs.to(coeffs.dtype)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, g = x.to(acc), grad_y.to(acc)
    slope = torch.zeros_like(xf)
    for k in range(degree, 0, -1):
        slope = slope * xf + k * _broadcast_coeff(coeffs, k, x, dim).to(acc)
    reduce_dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    power = torch.ones_like(xf)
    dcoeffs = []
    for _ in range(degree + 1):
        dcoeffs.append((g * power).sum(reduce_dims) if reduce_dims else g * power)
        power = power * xf
    return (g * slope).to(x.dtype).contiguous(), torch.stack(dcoeffs, dim=1).to(coeffs.dtype)


def _setup_context(ctx, inputs, output):
    x, coeffs, dim = inputs
    ctx.save_for_backward(x, coeffs)
    ctx.dim = dim


def _backward(ctx, grad_y):
    x, coeffs = ctx.saved_tensors
    dx, dcoeffs = torch.ops.rewrite.row_polynomial_backward(grad_y, x, coeffs, ctx.dim)
    return dx, dcoeffs, None


row_polynomial.register_autograd(_backward, setup_context=_setup_context)
