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
    """Gradients of the float inputs: the vector-Jacobian product of the reference.

    ``torch.func.vjp`` rather than ``torch.autograd.grad``: an op's implementation runs below
    the autograd dispatch keys, where autograd records nothing, while functorch's transforms
    still apply."""
    float_inputs = [k for k, x in enumerate(inputs) if x.is_floating_point()]

    def float_outputs(*floats):
        full = list(inputs)
        for k, t in zip(float_inputs, floats):
            full[k] = t
        return tuple(o for o in region.run_reference(full) if o.is_floating_point())

    _, vjp = torch.func.vjp(float_outputs, *(inputs[k] for k in float_inputs))
    return fresh_outputs(vjp(tuple(grads)), inputs + grads)


def fresh_outputs(outputs, inputs) -> list[torch.Tensor]:
    """Contiguous outputs that share no memory with the inputs (an op may not return its
    inputs: the gradient of ``x + y`` with respect to x is the incoming gradient itself)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    fresh = []
    for t in outputs:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        taken.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh


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
    from codegen.pointwise import inputs_needed_by_backward

    tensors, spec = inputs
    # On the kernel path, inputs the backward kernel does not read are kept as one element
    # broadcast to their shape. The reference backward recomputes the whole region, so it
    # keeps them all.
    if tensors and kernels_enabled(tensors[0]):
        needed = inputs_needed_by_backward(_region(spec))
        tensors = [t if keep else t.new_ones(()).expand(t.shape) for t, keep in zip(tensors, needed)]
    ctx.save_for_backward(*tensors)
    ctx.spec = spec
    ctx.float_outputs = [o.is_floating_point() for o in output]


def _backward(ctx, grads):
    inputs = list(ctx.saved_tensors)
    grads = [g for g, is_float in zip(grads, ctx.float_outputs) if is_float]
    float_grads = iter(torch.ops.rewrite.pointwise_backward(inputs, grads, ctx.spec))
    return [next(float_grads) if x.is_floating_point() else None for x in inputs], None


pointwise.register_autograd(_backward, setup_context=_setup_context)
