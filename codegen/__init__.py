"""Triton code for the regions the passes create.

- ``pointwise(fn, *example_tensors)``: a function of elementwise ops compiled to a Triton
  kernel (forward and backward) through sympy and a Triton printer; ``Region`` and
  ``extract_region`` do the same for a set of fx nodes a pass marked.
- ``templates``: parameterised kernels for what is not pointwise (2-bit packing, row
  reductions, a row-wise polynomial, a masked sampled matmul).
- ``cache``: emitted source in ``<cache dir>/<sha256>.py`` (a private directory), run from its
  checked text, memoised.
- ``ops``: ``torch.ops.rewrite.pointwise`` / ``pointwise_backward``, the ``triton_op``s that
  carry a region through export, ``torch.compile`` and ``.pt2`` files.

Nothing here imports triton until a kernel is emitted, so ``import rewrite`` works on
machines without it (the ops then run their PyTorch reference).
"""

from codegen.cache import cache_dir, set_cache_dir
from codegen.launch import quiet_op_registration, use_triton_on_cpu

with quiet_op_registration():
    from codegen import ops  # noqa: F401 - registers torch.ops.rewrite.pointwise (the kernels' op)
from codegen.pointwise import PointwiseKernel, pointwise
from codegen.region import Region, UnsupportedRegion, extract_region

__all__ = [
    "PointwiseKernel",
    "Region",
    "UnsupportedRegion",
    "cache_dir",
    "extract_region",
    "pointwise",
    "set_cache_dir",
    "use_triton_on_cpu",
]
