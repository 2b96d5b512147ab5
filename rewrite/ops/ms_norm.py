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

y is contiguous, in ``out_dtype`` (default: x's dtype); rstd is float32 (float64 for float64
inputs) with the normalized dimensions kept as size 1. Under autocast a float32 input gives y
in the autocast dtype: the linear layer after the norm then reads (and saves) y as it is
instead of saving a cast copy of it, so the memory stays shared under mixed precision too.
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


def _output_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return x.dtype if out_dtype is None else out_dtype


def _fake(x, normalized_shape, out_dtype):
    y = x.new_empty(x.shape, dtype=_output_dtype(x, out_dtype))
    return y, x.new_empty(_stat_shape(x, normalized_shape), dtype=_accumulation_dtype(x.dtype))


@torch.library.custom_op("rewrite::ms_layer_norm", mutates_args=())
def ms_layer_norm(
    x: torch.Tensor, normalized_shape: list[int], eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine parameters; returns the output and rstd for the backward."""
    acc = _accumulation_dtype(x.dtype)
    y, _, rstd = torch.ops.aten.native_layer_norm(x.to(acc).contiguous(), normalized_shape, None, None, eps)
    return y.to(_output_dtype(x, out_dtype)), rstd.to(acc)


@ms_layer_norm.register_fake
def _(x, normalized_shape, eps, out_dtype=None):
    return _fake(x, normalized_shape, out_dtype)


@torch.library.custom_op("rewrite::ms_rms_norm", mutates_args=())
def ms_rms_norm(
    x: torch.Tensor, normalized_shape: list[int], eps: float | None = None, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm without a weight; returns the output and rstd for the backward."""
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc).contiguous()
    rstd = torch.rsqrt(xf.pow(2).mean(_normalized_dims(normalized_shape), keepdim=True) + rms_eps(eps, x.dtype))
    return (xf * rstd).to(_output_dtype(x, out_dtype)), rstd


@ms_rms_norm.register_fake
def _(x, normalized_shape, eps=None, out_dtype=None):
    return _fake(x, normalized_shape, out_dtype)


def _setup_context(ctx, inputs, output):
    y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(y, rstd)
    ctx.dims = _normalized_dims(inputs[1])
    ctx.input_dtype = inputs[0].dtype


def _layer_norm_backward(ctx, grad_y, grad_rstd):
    y, rstd = ctx.saved_tensors
    g, yf = grad_y.to(rstd.dtype), y.to(rstd.dtype)
    dims = ctx.dims
    dx = (g - g.mean(dims, keepdim=True) - yf * (g * yf).mean(dims, keepdim=True)) * rstd
    return dx.to(ctx.input_dtype), None, None, None


def _rms_norm_backward(ctx, grad_y, grad_rstd):
    y, rstd = ctx.saved_tensors
    g, yf = grad_y.to(rstd.dtype), y.to(rstd.dtype)
    dx = (g - yf * (g * yf).mean(ctx.dims, keepdim=True)) * rstd
    return dx.to(ctx.input_dtype), None, None, None


ms_layer_norm.register_autograd(_layer_norm_backward, setup_context=_setup_context)
ms_rms_norm.register_autograd(_rms_norm_backward, setup_context=_setup_context)

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
