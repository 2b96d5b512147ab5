"""The sampled dense-dense product: ``(a @ b) * mask``, computing only the tiles the mask
keeps (for backward passes that need a weight gradient only where the weight is non-zero).

    torch.ops.rewrite.masked_matmul(a, b, mask) -> out

a is [M, K], b is [K, N], mask is [M, N] (bool or float; a float mask scales, and gets a
gradient when it requires one). On the kernel
path codegen's masked_matmul template multiplies tile by tile with ``tl.dot`` in IEEE float32
and skips tiles whose mask is all zero.
"""

from __future__ import annotations

import torch

from codegen import launch as kernels


@torch.library.triton_op("rewrite::masked_matmul", mutates_args=())
def masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or tuple(mask.shape) != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"masked_matmul: needs a [M, K], b [K, N], mask [M, N]; got {list(a.shape)}, {list(b.shape)}, "
            f"{list(mask.shape)}"
        )
    if kernels.wants_triton(a) and a.dtype == b.dtype:
        from codegen.templates import masked_matmul as kernel

        return kernel(a, b, mask)
    return ((a @ b) * mask.to(a.dtype)).contiguous()


def _setup_context(ctx, inputs, output):
    a, b, mask = inputs
    ctx.save_for_backward(a, b, mask)


def _backward(ctx, grad):
    a, b, mask = ctx.saved_tensors
    masked = grad * mask.to(grad.dtype)
    # A float mask scales the product, so it has a gradient too (a bool mask has none).
    grad_mask = grad * (a @ b) if ctx.needs_input_grad[2] and mask.is_floating_point() else None
    return masked @ b.t(), a.t() @ masked, grad_mask


masked_matmul.register_autograd(_backward, setup_context=_setup_context)
