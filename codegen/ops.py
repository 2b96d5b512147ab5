"""``torch.ops.rewrite.pointwise``: a pointwise region as one op, its kernels emitted by codegen.

    torch.ops.rewrite.pointwise(inputs: Tensor[], spec: str) -> Tensor[]
    torch.ops.rewrite.pointwise_backward(inputs: Tensor[], grads: Tensor[], spec: str) -> Tensor[]

``spec`` is the region's program (``Region.to_spec``), so an exported or saved graph carries
everything needed to rebuild the kernels; the backward returns the gradients of the float
inputs, in order. Both are ``torch.library.triton_op``s: on CUDA (and on the CPU under
``use_triton_on_cpu``) they launch the emitted kernels through ``wrap_triton``, which lets
``torch.export`` and ``torch.compile`` see the kernels; elsewhere they run the region op by op
with PyTorch, and that reference is also their fake kernel.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from codegen.launch import kernels_enabled
from codegen.region import Region


def _region(spec: str) -> Region:
    return Region.from_spec(spec)


@triton_op("rewrite::pointwise", mutates_args=())
def pointwise(inputs: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    region = _region(spec)
    if inputs and kernels_enabled(inputs[0]):
        from codegen.pointwise import launch_forward

        return launch_forward(region, inputs)
    return region.run_reference(inputs)


@triton_op("rewrite::pointwise_backward", mutates_args=())
def pointwise_backward(inputs: list[torch.Tensor], grads: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    """Gradients of the region's float operands (its inputs after their views, in order),
    each summed to the operand's shape."""
    from codegen.pointwise import launch_backward, reference_backward

    region = _region(spec)
    if inputs and kernels_enabled(inputs[0]):
        return launch_backward(region, inputs, grads)
    return reference_backward(region, inputs, grads)


def _setup_context(ctx, inputs, output):
    from codegen.pointwise import inputs_needed_by_backward

    tensors, spec = inputs
    # Inputs the backward does not read are not kept: the backward gets a one-element
    # stand-in broadcast to their shape (its views still need the shape).
    needed = inputs_needed_by_backward(_region(spec))
    ctx.save_for_backward(*(t for t, keep in zip(tensors, needed) if keep))
    ctx.stand_ins = [None if keep else (t.shape, t.dtype, t.device) for t, keep in zip(tensors, needed)]
    ctx.spec = spec
    ctx.float_outputs = [o.is_floating_point() for o in output]


def _backward(ctx, grads):
    from codegen.pointwise import differentiable_operands

    saved = iter(ctx.saved_tensors)
    inputs = [
        next(saved) if stand_in is None else torch.ones((), dtype=stand_in[1], device=stand_in[2]).expand(stand_in[0])
        for stand_in in ctx.stand_ins
    ]
    region = _region(ctx.spec)
    grads = [g for g, is_float in zip(grads, ctx.float_outputs) if is_float]
    operand_grads = torch.ops.rewrite.pointwise_backward(inputs, grads, ctx.spec)
    # The op gives gradients with respect to the operands (the inputs after their views);
    # autograd through the views carries them back to the inputs.
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        operands, _ = region.apply_views(leaves)
        float_operands = [operands[k] for k in differentiable_operands(region)]
        float_leaves = [x for x in leaves if x.is_floating_point()]
        pairs = [(o, g) for o, g in zip(float_operands, operand_grads) if o.requires_grad]
        if pairs:
            found = torch.autograd.grad([o for o, _ in pairs], float_leaves, [g for _, g in pairs], allow_unused=True)
        else:
            found = [None] * len(float_leaves)
    found = iter(found)
    return [next(found) if x.is_floating_point() else None for x in inputs], None


pointwise.register_autograd(_backward, setup_context=_setup_context)
