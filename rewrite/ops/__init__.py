"""The ``torch.ops.rewrite`` custom-op library. Importing it registers every op (with its fake
kernel and autograd formula), which is what loading a rewritten ``.pt2`` needs: the ops of
approx_bp here, and codegen's ``pointwise`` ops that carry emitted kernels."""

import codegen.ops  # noqa: F401 - registers torch.ops.rewrite.pointwise / pointwise_backward
from codegen.launch import use_triton_on_cpu
from rewrite.ops import ms_norm, step_activation

__all__ = ["ms_norm", "step_activation", "use_triton_on_cpu"]
