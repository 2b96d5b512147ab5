"""ReGELU2 and ReSiLU2: the exact activation forward, a 2-bit step-function derivative backward.

Approx-BP (REFERENCES.md, approx_bp) replaces the derivative of GELU/SiLU by the derivative of
h(x) = sum_i a_i * max(x - c_i, 0). Each element keeps only how many thresholds c_i it
exceeds (a code 0..3, two bits, four codes per byte: element k of a group of four in bits
2k..2k+1); the backward is grad_out * slope[code] with slope[k] = a_0 + ... + a_{k-1}.

Ops (all with fake kernels, so they export, save in .pt2 and compile):

    torch.ops.rewrite.regelu2(x, approximate="none") -> (gelu(x), codes)
    torch.ops.rewrite.resilu2(x) -> (silu(x), codes)
    torch.ops.rewrite.step2_backward(grad_out, codes, slopes) -> grad_in

``codes`` is a flat uint8 tensor of ceil(x.numel() / 4) bytes in x's row-major order; the
outputs are contiguous whatever the layout of the inputs.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen import launch as kernels


@dataclass(frozen=True)
class StepApproximation:
    """Constants of one 2-bit approximation: slopes ``a`` and sorted thresholds ``c``."""

    name: str
    a: tuple[float, float, float]
    c: tuple[float, float, float]

    @property
    def slopes(self) -> list[float]:
        """The derivative for codes 0..3: cumulative sums of ``a`` (the last is 1)."""
        return [0.0, self.a[0], self.a[0] + self.a[1], self.a[0] + self.a[1] + self.a[2]]

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The step derivative h'(x) as a float tensor (for tests and error reports)."""
        codes = step_codes(x.reshape(-1), self.c).to(torch.int64)
        return torch.tensor(self.slopes, dtype=torch.float64)[codes].reshape(x.shape)


REGELU2 = StepApproximation(
    "regelu2",
    a=(-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
    c=(-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
)
RESILU2 = StepApproximation(
    "resilu2",
    a=(-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
    c=(-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
)

_LITTLE_ENDIAN = sys.byteorder == "little"


def packed_size(numel):
    return (numel + 3) // 4


def step_codes(x_flat: torch.Tensor, thresholds) -> torch.Tensor:
    """uint8 codes: how many of the (sorted) thresholds each element exceeds, compared in
    float32 at least (a half tensor would round the thresholds to half)."""
    c0, c1, c2 = thresholds
    if x_flat.dtype in (torch.float16, torch.bfloat16):
        x_flat = x_flat.float()
    codes = (x_flat > c0).to(torch.uint8)
    codes += x_flat > c1
    codes += x_flat > c2
    return codes


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes four to a byte (code k of each group of four in bits 2k..2k+1)."""
    n = codes.numel()
    pad = (-n) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    if not _LITTLE_ENDIAN or n == 0:
        g = codes.view(-1, 4)
        return g[:, 0] | (g[:, 1] << 2) | (g[:, 2] << 4) | (g[:, 3] << 6)
    # Read each group of four bytes as one little-endian int32 (byte k at bits 8k) and move
    # byte k's two bits down to bits 2k: four shifts over n/4 words instead of eight passes.
    w = codes.view(torch.int32)
    return ((w | (w >> 6) | (w >> 12) | (w >> 18)) & 0xFF).to(torch.uint8)


def unpack2(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack2: uint8 codes, ``numel`` of them."""
    if not _LITTLE_ENDIAN or packed.numel() == 0:
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & 3).reshape(-1)[:numel]
    w = packed.to(torch.int32)
    spread = (w & 0x3) | ((w & 0xC) << 6) | ((w & 0x30) << 12) | ((w & 0xC0) << 18)
    return spread.view(torch.uint8)[:numel]


def _activation(kind: str, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate) if kind == "regelu2" else F.silu(x)


@functools.cache
def template_expressions(name: str, approximate: str):
    """The activation and its 2-bit code as expressions of the element, for codegen's packed2
    template."""
    import sympy

    from codegen.sym import Sigmoid, gelu_expression
    from codegen.templates import X

    approx = REGELU2 if name == "regelu2" else RESILU2
    value = gelu_expression(X, approximate) if name == "regelu2" else X * Sigmoid(X)
    code = sum(sympy.Piecewise((1, X > sympy.Float(c, 17)), (0, True)) for c in approx.c)
    return value, code


@functools.cache
def template_gradient(slopes: tuple[float, ...]):
    import sympy

    from codegen.templates import CODE, GRAD

    slope = sympy.Piecewise(*((sympy.Float(s, 17), sympy.Eq(CODE, k)) for k, s in enumerate(slopes) if k), (0, True))
    return GRAD * slope


def _forward(approx: StepApproximation, x: torch.Tensor, approximate: str):
    x = x.contiguous()
    if kernels.wants_triton(x):
        from codegen.templates import packed2_forward

        return packed2_forward(x, *template_expressions(approx.name, approximate))
    y = _activation(approx.name, x, approximate)
    return y, pack2(step_codes(x.view(-1), approx.c))


@torch.library.triton_op("rewrite::regelu2", mutates_args=())
def regelu2(x: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """GELU forward (exact, or the tanh form when ``approximate='tanh'``) and its 2-bit codes."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"regelu2: approximate must be 'none' or 'tanh', not {approximate!r}")
    return _forward(REGELU2, x, approximate)


@torch.library.triton_op("rewrite::resilu2", mutates_args=())
def resilu2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU forward (exact) and its 2-bit codes."""
    return _forward(RESILU2, x, "none")


@torch.library.triton_op("rewrite::step2_backward", mutates_args=())
def step2_backward(grad_out: torch.Tensor, codes: torch.Tensor, slopes: list[float]) -> torch.Tensor:
    """grad_out * slopes[code], codes unpacked from ``codes``."""
    grad_out = grad_out.contiguous()
    if kernels.wants_triton(grad_out):
        from codegen.templates import packed2_backward

        return packed2_backward(grad_out, codes, template_gradient(tuple(float(s) for s in slopes)))
    unpacked = unpack2(codes, grad_out.numel())
    table = torch.tensor(slopes, dtype=torch.float32, device=grad_out.device)
    slope = table.index_select(0, unpacked.to(torch.int32)).view(grad_out.shape)
    if grad_out.dtype == torch.float32:
        return grad_out * slope
    return (grad_out.float() * slope).to(grad_out.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _make_backward(approx: StepApproximation, non_tensor_inputs: int):
    slopes = approx.slopes

    def backward(ctx, grad_y, grad_codes):
        (codes,) = ctx.saved_tensors
        return (torch.ops.rewrite.step2_backward(grad_y, codes, slopes),) + (None,) * non_tensor_inputs

    return backward


regelu2.register_autograd(_make_backward(REGELU2, non_tensor_inputs=1), setup_context=_setup_context)
resilu2.register_autograd(_make_backward(RESILU2, non_tensor_inputs=0), setup_context=_setup_context)
