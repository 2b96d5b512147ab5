"""The ``torch.ops.rewrite`` custom-op library. Importing it registers every op (with its fake
kernel and autograd formula), which is what loading a rewritten ``.pt2`` needs: the ops of
approx_bp, the hooks later passes build on (``row_polynomial``, ``masked_matmul``), and
codegen's ``pointwise`` ops that carry emitted kernels. Each op runs codegen's Triton kernels
on CUDA (and on the CPU under ``use_triton_on_cpu``) and its PyTorch reference elsewhere."""

from codegen.launch import quiet_op_registration, use_triton_on_cpu

with quiet_op_registration():
    import codegen.ops  # noqa: F401 - registers torch.ops.rewrite.pointwise / pointwise_backward
    from rewrite.ops import masked_matmul, ms_norm, row_polynomial, step_activation

__all__ = ["masked_matmul", "ms_norm", "row_polynomial", "step_activation", "use_triton_on_cpu"]
