"""Memory-sharing LayerNorm and RMSNorm (Approx-BP): save the output and rstd, not the input.

The plain norms save their input x for the backward; the linear layer after them saves the
norm's output too. These variants have no affine parameters (the approx_bp pass folds them
into the following linear layers) and compute their backward from the output y alone:

    LayerNorm: dx = rstd * (g - mean(g) - y * mean(g * y))
    RMSNorm:   dx = rstd * (g - y * mean(g * y))

(means over the normalized dimensions), so the tensor the linear layer keeps is the only
activation kept, shared by both.

    torch.ops.rewrite.ms_layer_norm(x, normalized_shape, eps, out_dtype=None) -> (y, rstd)
    torch.ops.rewrite.ms_rms_norm(x, normalized_shape, eps=None, out_dtype=None) -> (y, rstd)
    torch.ops.rewrite.ms_norm_backward(grad_y, y, rstd, normalized_shape, rms, out_dtype) -> dx

y is contiguous, in ``out_dtype`` (default: x's dtype); rstd is float32 (float64 for float64
inputs) with the normalized dimensions kept as size 1. Under autocast a float32 input gives y
in the autocast dtype: the linear layer after the norm then reads (and saves) y as it is
instead of saving a cast copy of it, so the memory stays shared under mixed precision too.
"""

from __future__ import annotations

import functools
import math

import torch

from codegen import launch as kernels


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalized_dims(normalized_shape) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


def _stat_shape(x: torch.Tensor, normalized_shape) -> list:
    return [*x.shape[: x.dim() - len(normalized_shape)], *([1] * len(normalized_shape))]


def rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The epsilon aten.rms_norm uses when none is given: that of its accumulation type."""
    return torch.finfo(_accumulation_dtype(dtype)).eps if eps is None else eps


def _output_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return x.dtype if out_dtype is None else out_dtype


@functools.cache
def _row_kernels(rms: bool):
    from codegen.templates import layer_norm_kernels, rms_norm_kernels

    return rms_norm_kernels() if rms else layer_norm_kernels()


def _check_shape(op: str, x: torch.Tensor, normalized_shape) -> None:
    if list(x.shape[x.dim() - len(normalized_shape):]) != list(normalized_shape) or len(normalized_shape) > x.dim():
        raise ValueError(
            f"{op}: normalized_shape {list(normalized_shape)} must be the trailing dimensions of the input, "
            f"whose shape is {list(x.shape)}"
        )


def _uses_kernels(x: torch.Tensor, normalized_shape) -> bool:
    """codegen's row template computes in float32: float16/bfloat16/float32 inputs."""
    return kernels.wants_triton(x) and math.prod(normalized_shape) > 0


def _forward_kernel(x, normalized_shape, eps: float, out_dtype, rms: bool):
    n = math.prod(normalized_shape)
    rows = x.numel() // n if n else 0
    (y,), (rstd,) = _row_kernels(rms)[0]([x.reshape(rows, n)], scalars=[eps], output_dtype=_output_dtype(x, out_dtype))
    return y.view(x.shape), rstd.view(_stat_shape(x, normalized_shape))


@torch.library.triton_op("rewrite::ms_layer_norm", mutates_args=())
def ms_layer_norm(
    x: torch.Tensor, normalized_shape: list[int], eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine parameters; returns the output and rstd for the backward."""
    _check_shape("ms_layer_norm", x, normalized_shape)
    if _uses_kernels(x, normalized_shape):
        return _forward_kernel(x, normalized_shape, eps, out_dtype, rms=False)
    acc = _accumulation_dtype(x.dtype)
    y, _, rstd = torch.ops.aten.native_layer_norm(x.to(acc).contiguous(), normalized_shape, None, None, eps)
    return y.to(_output_dtype(x, out_dtype)), rstd.to(acc).view(_stat_shape(x, normalized_shape))


@torch.library.triton_op("rewrite::ms_rms_norm", mutates_args=())
def ms_rms_norm(
    x: torch.Tensor, normalized_shape: list[int], eps: float | None = None, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm without a weight; returns the output and rstd for the backward."""
    _check_shape("ms_rms_norm", x, normalized_shape)
    if _uses_kernels(x, normalized_shape):
        return _forward_kernel(x, normalized_shape, rms_eps(eps, x.dtype), out_dtype, rms=True)
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc).contiguous()
    rstd = torch.rsqrt(xf.pow(2).mean(_normalized_dims(normalized_shape), keepdim=True) + rms_eps(eps, x.dtype))
    return (xf * rstd).to(_output_dtype(x, out_dtype)), rstd


@torch.library.triton_op("rewrite::ms_norm_backward", mutates_args=())
def ms_norm_backward(
    grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, normalized_shape: list[int], rms: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """dx of the memory-sharing norms from their output y and rstd (formulas above)."""
    if _uses_kernels(grad_y, normalized_shape) and rstd.dtype == torch.float32:
        n = math.prod(normalized_shape)
        rows = grad_y.numel() // n
        (dx,), _ = _row_kernels(rms)[1](
            [grad_y.reshape(rows, n), y.reshape(rows, n)], [rstd.reshape(rows)], output_dtype=out_dtype
        )
        return dx.view(grad_y.shape)
    g, yf = grad_y.to(rstd.dtype), y.to(rstd.dtype)
    dims = _normalized_dims(normalized_shape)
    mean_gy = (g * yf).mean(dims, keepdim=True)
    dx = (g - yf * mean_gy) * rstd if rms else (g - g.mean(dims, keepdim=True) - yf * mean_gy) * rstd
    return dx.to(out_dtype).contiguous()


def _setup_context(ctx, inputs, output):
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(y, rstd)
    ctx.normalized_shape = list(inputs[1])
    ctx.input_dtype = inputs[0].dtype


def _backward(rms: bool):
    def backward(ctx, grad_y, grad_rstd):
        y, rstd = ctx.saved_tensors
        dx = torch.ops.rewrite.ms_norm_backward(grad_y, y, rstd, ctx.normalized_shape, rms, ctx.input_dtype)
        return dx, None, None, None

    return backward


ms_layer_norm.register_autograd(_backward(rms=False), setup_context=_setup_context)
ms_rms_norm.register_autograd(_backward(rms=True), setup_context=_setup_context)

_library = torch.library.Library("rewrite", "FRAGMENT")


def _register_autocast(op, device_type: str) -> None:
    """Under autocast, a float32 input gives y in the autocast dtype (the dtype the next
    linear layer computes in), with the normalization itself still computed in float32."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_, x, normalized_shape, eps=None, out_dtype=None):
        if out_dtype is None and x.dtype == torch.float32:
            out_dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(x, normalized_shape, eps, out_dtype)

    _library.impl(op._schema.name.split("::")[1], kernel, key, with_keyset=True)


for _op in (torch.ops.rewrite.ms_layer_norm.default, torch.ops.rewrite.ms_rms_norm.default):
    for _device in ("cpu", "cuda"):
        _register_autocast(_op, _device)
