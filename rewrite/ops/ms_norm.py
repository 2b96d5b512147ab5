"""Memory-sharing LayerNorm and RMSNorm (Approx-BP): save the output and rstd, not the input.

The plain norms save their input x for the backward; the linear layer after them saves the
norm's output too. These variants have no affine parameters (the approx_bp pass folds them
into the following linear layers) and compute their backward from the output y alone:

    LayerNorm: dx = rstd * (g - mean(g) - y * mean(g * y))
    RMSNorm:   dx = rstd * (g - y * mean(g * y))

(means over the normalized dimensions), so the tensor the linear layer keeps is the only
activation kept, shared by both.

    torch.ops.rewrite.ms_layer_norm(x, normalized_shape, eps) -> (y, rstd)
    torch.ops.rewrite.ms_rms_norm(x, normalized_shape, eps=None) -> (y, rstd)

rstd is float32 (float64 for float64 inputs) with the normalized dimensions kept as size 1.
"""

from __future__ import annotations

import torch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalized_dims(normalized_shape) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


def _stat_shape(x: torch.Tensor, normalized_shape) -> list:
    return [*x.shape[: x.dim() - len(normalized_shape)], *([1] * len(normalized_shape))]


def rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The epsilon aten.rms_norm uses when none is given: that of its accumulation type."""
    return torch.finfo(_accumulation_dtype(dtype)).eps if eps is None else eps


@torch.library.custom_op("rewrite::ms_layer_norm", mutates_args=())
def ms_layer_norm(x: torch.Tensor, normalized_shape: list[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine parameters; returns the output and rstd for the backward."""
    acc = _accumulation_dtype(x.dtype)
    y, _, rstd = torch.ops.aten.native_layer_norm(x.to(acc), normalized_shape, None, None, eps)
    return y.to(x.dtype), rstd.to(acc)


@ms_layer_norm.register_fake
def _(x, normalized_shape, eps):
    return torch.empty_like(x), x.new_empty(_stat_shape(x, normalized_shape), dtype=_accumulation_dtype(x.dtype))


@torch.library.custom_op("rewrite::ms_rms_norm", mutates_args=())
def ms_rms_norm(
    x: torch.Tensor, normalized_shape: list[int], eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm without a weight; returns the output and rstd for the backward."""
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(_normalized_dims(normalized_shape), keepdim=True) + rms_eps(eps, x.dtype))
    return (xf * rstd).to(x.dtype), rstd


@ms_rms_norm.register_fake
def _(x, normalized_shape, eps=None):
    return torch.empty_like(x), x.new_empty(_stat_shape(x, normalized_shape), dtype=_accumulation_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(y, rstd)
    ctx.dims = _normalized_dims(inputs[1])


def _layer_norm_backward(ctx, grad_y, grad_rstd):
    y, rstd = ctx.saved_tensors
    g, yf = grad_y.to(rstd.dtype), y.to(rstd.dtype)
    dims = ctx.dims
    dx = (g - g.mean(dims, keepdim=True) - yf * (g * yf).mean(dims, keepdim=True)) * rstd
    return dx.to(y.dtype), None, None


def _rms_norm_backward(ctx, grad_y, grad_rstd):
    y, rstd = ctx.saved_tensors
    g, yf = grad_y.to(rstd.dtype), y.to(rstd.dtype)
    dx = (g - yf * (g * yf).mean(ctx.dims, keepdim=True)) * rstd
    return dx.to(y.dtype), None, None


ms_layer_norm.register_autograd(_layer_norm_backward, setup_context=_setup_context)
ms_rms_norm.register_autograd(_rms_norm_backward, setup_context=_setup_context)
