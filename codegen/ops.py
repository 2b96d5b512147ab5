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


def reference_backward(region: Region, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of the float inputs by autograd through the reference."""
    float_inputs = [k for k, x in enumerate(inputs) if x.is_floating_point()]
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        outputs = region.run_reference(leaves)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.is_floating_point() and o.requires_grad]
        if not pairs:
            return [torch.zeros_like(inputs[k]) for k in float_inputs]
        result = torch.autograd.grad(
            [o for o, _ in pairs], [leaves[k] for k in float_inputs], [g for _, g in pairs], allow_unused=True
        )
    return [torch.zeros_like(inputs[k]) if g is None else g.contiguous() for k, g in zip(float_inputs, result)]


@triton_op("rewrite::pointwise_backward", mutates_args=())
def pointwise_backward(inputs: list[torch.Tensor], grads: list[torch.Tensor], spec: str) -> list[torch.Tensor]:
    region = _region(spec)
    if inputs and kernels_enabled(inputs[0]):
        from codegen.pointwise import launch_backward

        return launch_backward(region, inputs, grads)
    if any(torch._subclasses.fake_tensor.is_fake(x) for x in inputs):
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs if x.is_floating_point()]
    return reference_backward(region, inputs, grads)


def _setup_context(ctx, inputs, output):
    tensors, spec = inputs
    ctx.save_for_backward(*tensors)
    ctx.spec = spec
    ctx.float_outputs = [o.is_floating_point() for o in output]


def _backward(ctx, grads):
    inputs = list(ctx.saved_tensors)
    region = _region(ctx.spec)
    grads = [g for g, is_float in zip(grads, ctx.float_outputs) if is_float]
    float_grads = iter(torch.ops.rewrite.pointwise_backward(inputs, grads, region.to_spec()))
    return [next(float_grads) if x.is_floating_point() else None for x in inputs], None


pointwise.register_autograd(_backward, setup_context=_setup_context)
