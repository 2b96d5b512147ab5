"""The ``torch.ops.rewrite`` custom-op library. Importing it registers every op (with its fake
kernel and autograd formula), which is what loading a rewritten ``.pt2`` needs."""

from rewrite.ops import ms_norm, step_activation
from rewrite.ops.kernels import use_triton_on_cpu

__all__ = ["ms_norm", "step_activation", "use_triton_on_cpu"]
