"""codegen's templates through the ops built on them: the memory-sharing norms (row template),
the row-wise polynomial (row template with per-row statistics as outputs), the masked sampled
matmul and a packed2 instance other than approx_bp's. Each kernel runs on the CPU under
TRITON_INTERPRET=1 (``use_triton_on_cpu``) and is compared with a float64 eager formula on
fresh random inputs; the PyTorch reference path of each op is held to the same formulas."""

from __future__ import annotations

import ast
import contextlib
import os
import re

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewrite  # noqa: F401 - registers torch.ops.rewrite
from codegen import cache, templates
from codegen.templates import (
    CODE,
    GRAD,
    X,
    layer_norm_kernels,
    masked_matmul_source,
    packed2_backward,
    packed2_backward_source,
    packed2_forward,
    packed2_forward_source,
    rms_norm_kernels,
    row_polynomial_kernels,
)
from rewrite.ops import use_triton_on_cpu
from rewrite.ops.step_activation import pack2

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)"
)

# ||out - ref|| / ||ref|| against float64. float32: the templates compute in float32, a row
# of 5000 elements sums in a tree, far under 1e-5. float16: inputs and outputs are rounded to
# float16 (unit roundoff 4.9e-4, about 3e-4 in the norm) around float32 arithmetic: 2e-3.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]
PATHS = ["kernel", "reference"]


@pytest.fixture(autouse=True, scope="module")
def _private_kernel_cache(tmp_path_factory):
    """Kernels go to a fresh directory: the tests do not depend on what ~/.cache holds."""
    cache.set_cache_dir(tmp_path_factory.mktemp("kernels"))
    yield
    cache.set_cache_dir(None)


@contextlib.contextmanager
def on_path(path: str):
    """Run the ops on their kernel or their reference path; yields the names of the template
    kernels launched inside the block (a kernel path that quietly fell back to the reference
    would pass every comparison)."""
    launched: list[str] = []
    original = templates._launch

    def counting(source, name, *args, **kwargs):
        launched.append(name)
        return original(source, name, *args, **kwargs)

    templates._launch = counting
    try:
        with use_triton_on_cpu() if path == "kernel" else contextlib.nullcontext():
            yield launched
    finally:
        templates._launch = original


def assert_launched(path: str, launched: list[str], expected: set[str], empty: bool = False) -> None:
    if path == "kernel" and not empty:
        assert expected <= set(launched), f"kernels launched: {launched}, expected {sorted(expected)}"
    else:
        assert launched == [], f"the {path} path launched {launched}"


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, terms: torch.Tensor | None = None) -> None:
    """Same shape; finite (NaN never passes); within ``tol`` of the reference in the norm and
    element by element (one wrong element cannot hide in a large norm). ``terms``: the size of
    the terms the result is a difference of, when they can cancel; the error is measured
    against them (float32 cannot do better than rounding them). A reference of all zeros
    without ``terms`` must be matched exactly."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: NaN/inf in the output"
    out, ref = out.double(), ref.double()
    size = ref.abs() if terms is None else torch.maximum(ref.abs(), terms.double().abs())
    diff = (out - ref).norm().item()
    scale = size.norm().item()
    assert diff <= tol * scale, f"{what}: relative error {diff / max(scale, 1e-300):.3g} >= {tol:g} (scale {scale:.3g})"
    worst = (out - ref).abs().max().item()
    assert worst <= 10 * tol * size.max().item(), f"{what}: worst element off by {worst:.3g}"


def shifted_randn(*shape, dtype, scale=2.5):
    """Rows with their own non-zero mean and a scale far from 1 (norms of N(0, 1) data hide
    a missing mean subtraction or a wrong variance)."""
    offsets = torch.randn(*shape[:-1], 1, dtype=torch.float64) * 4
    return (torch.randn(shape, dtype=torch.float64) * scale + offsets).to(dtype)


# ---- memory-sharing norms -----------------------------------------------------------------------

EPS = 1e-5


def layer_norm64(x64: torch.Tensor, n: int) -> torch.Tensor:
    return F.layer_norm(x64, [n], eps=EPS)


def rms_norm64(x64: torch.Tensor, n: int) -> torch.Tensor:
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)


def rstd64(x64: torch.Tensor, rms: bool) -> torch.Tensor:
    if rms:
        return torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    return torch.rsqrt((x64 - x64.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + EPS)


NORMS = {
    "ms_layer_norm": (False, layer_norm64),
    "ms_rms_norm": (True, rms_norm64),
}


def check_norm(op_name: str, path: str, leading: tuple, n: int, dtype: torch.dtype) -> None:
    rms, formula = NORMS[op_name]
    op = getattr(torch.ops.rewrite, op_name)
    x = shifted_randn(*leading, n, dtype=dtype).requires_grad_(True)
    g = torch.randn(*leading, n, dtype=torch.float64).to(dtype)
    with on_path(path) as launched:
        y, rstd = op(x, [n], EPS)
        (gx,) = torch.autograd.grad(y, x, g)
    assert_launched(path, launched, {f"{op_name}_forward", f"{op_name}_backward"}, empty=x.numel() == 0)
    assert y.dtype == dtype and gx.dtype == dtype and rstd.dtype == torch.float32
    assert rstd.shape == (*leading, 1)
    assert y.is_contiguous()
    x64 = x.detach().double().requires_grad_(True)
    y64 = formula(x64, n)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    tol = TOLERANCE[dtype]
    expected_rstd = rstd64(x64.detach(), rms)
    assert_matches(y, y64, tol, "y")
    assert_matches(rstd, expected_rstd, TOLERANCE[torch.float32], "rstd")
    # dx = rstd * (g - ...): for a row of one element the terms cancel to ~eps (RMSNorm) or
    # exactly 0 (LayerNorm), so the error is measured against g * rstd
    assert_matches(gx, gx64, tol, "grad x", terms=g.double() * expected_rstd)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 5000])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op_name", list(NORMS))
def test_norm_forward_and_backward_match_float64_for_row_lengths(op_name, path, n, dtype):
    # 5000 > the interpreter's 4096-column block: the kernels loop over column blocks
    check_norm(op_name, path, (3,), n, dtype)


@interpreted
@pytest.mark.parametrize("leading", [(), (2, 3), (2, 1, 5), (0,), (0, 4)], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op_name", list(NORMS))
def test_norm_leading_shapes_including_zero_rows(op_name, path, leading):
    check_norm(op_name, path, leading, 33, torch.float32)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_name", list(NORMS))
def test_norm_kernel_path_agrees_with_reference_path(op_name, dtype):
    op = getattr(torch.ops.rewrite, op_name)
    x = shifted_randn(4, 3, 96, dtype=dtype).requires_grad_(True)
    g = torch.randn(4, 3, 96, dtype=torch.float64).to(dtype)
    results = {}
    for path in PATHS:
        with on_path(path) as launched:
            y, rstd = op(x, [96], EPS)
            (gx,) = torch.autograd.grad(y, x, g)
        assert_launched(path, launched, {f"{op_name}_forward", f"{op_name}_backward"})
        results[path] = (y, rstd, gx)
    # one float16 rounding apart at most, from float32 values that agree to ~1e-7
    for k, what in enumerate(["y", "rstd", "grad x"]):
        tol = TOLERANCE[torch.float32] if what == "rstd" else TOLERANCE[dtype]
        assert results["kernel"][k].dtype == results["reference"][k].dtype, what
        assert_matches(results["kernel"][k], results["reference"][k], tol, what)


@interpreted
@pytest.mark.parametrize("path", PATHS)
def test_layer_norm_variance_survives_a_large_common_offset(path):
    # |x| ~ 100 with deviations ~ 1: E[x^2] - E[x]^2 in float32 loses ~5e-4 of the variance;
    # subtracting the mean first keeps the error at float32 rounding of x - mean (~1e-6).
    x = torch.randn(8, 256, dtype=torch.float64).add(100).float()
    with on_path(path) as launched:
        y, rstd = torch.ops.rewrite.ms_layer_norm(x, [256], EPS)
    assert_launched(path, launched, {"ms_layer_norm_forward"})
    assert_matches(y, layer_norm64(x.double(), 256), 5e-5, "y")
    assert_matches(rstd, rstd64(x.double(), rms=False), 5e-5, "rstd")


@interpreted
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op_name", list(NORMS))
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)], ids=str)
def test_norm_out_dtype_is_honoured(op_name, path, in_dtype, out_dtype):
    rms, formula = NORMS[op_name]
    op = getattr(torch.ops.rewrite, op_name)
    x = shifted_randn(5, 40, dtype=in_dtype).requires_grad_(True)
    g = torch.randn(5, 40, dtype=torch.float64).to(out_dtype)
    with on_path(path) as launched:
        y, rstd = op(x, [40], EPS, out_dtype)
        (gx,) = torch.autograd.grad(y, x, g)
    assert_launched(path, launched, {f"{op_name}_forward", f"{op_name}_backward"})
    assert y.dtype == out_dtype and rstd.dtype == torch.float32
    assert gx.dtype == in_dtype  # the gradient comes back in the input's dtype
    x64 = x.detach().double().requires_grad_(True)
    y64 = formula(x64, 40)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_matches(y, y64, TOLERANCE[torch.float16], "y")
    assert_matches(gx, gx64, TOLERANCE[torch.float16], "grad x")


@interpreted
@pytest.mark.parametrize("op_name", list(NORMS))
def test_norm_kernel_on_transposed_input_and_gradient(op_name):
    rms, formula = NORMS[op_name]
    op = getattr(torch.ops.rewrite, op_name)
    base = shifted_randn(6, 48, dtype=torch.float32).t().contiguous().requires_grad_(True)
    x = base.t()  # [6, 48] with row stride 1 and column stride 6
    g = torch.randn(48, 6).t()
    with on_path("kernel") as launched:
        y, rstd = op(x, [48], EPS)
        (gbase,) = torch.autograd.grad(y, base, g)
    assert_launched("kernel", launched, {f"{op_name}_forward", f"{op_name}_backward"})
    x64 = x.detach().double().requires_grad_(True)
    y64 = formula(x64, 48)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_matches(y, y64, 1e-5, "y")
    assert_matches(gbase.t(), gx64, 1e-5, "grad x")


@interpreted
def test_rms_norm_default_eps_is_float32_eps_on_the_kernel_path():
    x = shifted_randn(4, 30, dtype=torch.float16)
    with on_path("kernel") as launched:
        _, rstd = torch.ops.rewrite.ms_rms_norm(x, [30])
    assert_launched("kernel", launched, {"ms_rms_norm_forward"})
    eps = torch.finfo(torch.float32).eps
    expected = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    assert_matches(rstd, expected, 1e-5, "rstd")


@interpreted
@pytest.mark.parametrize("op_name", list(NORMS))
def test_norm_over_two_trailing_dims_on_the_kernel_path(op_name):
    rms, _ = NORMS[op_name]
    op = getattr(torch.ops.rewrite, op_name)
    x = shifted_randn(3, 4, 24, dtype=torch.float32).requires_grad_(True)
    g = torch.randn(3, 4, 24)
    with on_path("kernel") as launched:
        y, rstd = op(x, [4, 24], EPS)
        (gx,) = torch.autograd.grad(y, x, g)
    assert_launched("kernel", launched, {f"{op_name}_forward", f"{op_name}_backward"})
    assert rstd.shape == (3, 1, 1)
    x64 = x.detach().double().requires_grad_(True)
    if rms:
        y64 = x64 * torch.rsqrt(x64.pow(2).mean((-2, -1), keepdim=True) + EPS)
    else:
        y64 = F.layer_norm(x64, [4, 24], eps=EPS)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_matches(y, y64, 1e-5, "y")
    assert_matches(gx, gx64, 1e-5, "grad x")


def _template_ops(dtype):
    x = shifted_randn(3, 16, dtype=dtype)
    coeffs = torch.randn(16, 3).to(dtype)
    b = torch.randn(16, 5).to(dtype)
    keep = torch.rand(3, 5) < 0.5
    return [
        lambda: torch.ops.rewrite.ms_layer_norm(x, [16], EPS),
        lambda: torch.ops.rewrite.ms_rms_norm(x, [16], EPS),
        lambda: torch.ops.rewrite.row_polynomial(x, coeffs, 1),
        lambda: torch.ops.rewrite.masked_matmul(x, b, keep),
    ]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_float64_and_interpreted_bfloat16_take_the_reference_path(dtype):
    # float64 is exact on the reference; the interpreter has no bfloat16
    for k, call in enumerate(_template_ops(dtype)):
        expected = call()
        with on_path("kernel") as launched:
            out = call()
        assert launched == [], f"op {k} launched {launched} for {dtype}"
        for o, e in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
            assert o.dtype == e.dtype and torch.equal(o, e), f"op {k}"


@pytest.mark.parametrize("op_name", list(NORMS))
@pytest.mark.parametrize("normalized_shape", [[4], [5, 3], [2, 3, 4, 5]], ids=str)
def test_norm_normalized_shape_must_be_the_trailing_dims(op_name, normalized_shape):
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=re.escape(f"{list(normalized_shape)}")) as info:
        getattr(torch.ops.rewrite, op_name)(x, normalized_shape, EPS)
    assert "[2, 3, 5]" in str(info.value)


class _UsesLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y, _ = torch.ops.rewrite.ms_layer_norm(x, [16], EPS)
        return self.fc(y)


def test_export_keeps_the_ms_layer_norm_op():
    model, x = _UsesLayerNorm(), shifted_randn(3, 16, dtype=torch.float32)
    ep = torch.export.export(model, (x,), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewrite.ms_layer_norm.default in targets
    fresh = shifted_randn(3, 16, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(fresh), model(fresh), rtol=0, atol=0)


# ---- row polynomial -------------------------------------------------------------------------------

POLY_CASES = [
    ((2, 3, 4, 5), 1),  # the channels of an NCHW tensor
    ((6, 9), -1),  # the last dim of a 2-D tensor
    ((3, 5, 4), 1),  # the middle dim of a 3-D tensor
    ((0, 3), 1),  # no rows
]


def polynomial64(x64: torch.Tensor, coeffs64: torch.Tensor, dim: int) -> torch.Tensor:
    dim = dim % x64.dim()
    shape = [1] * x64.dim()
    shape[dim] = coeffs64.shape[0]
    return sum(coeffs64[:, k].reshape(shape) * x64**k for k in range(coeffs64.shape[1]))


@interpreted
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("shape,dim", POLY_CASES, ids=str)
def test_row_polynomial_forward_and_gradients_match_float64(shape, dim, degree, path):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5).float().requires_grad_(True)
    coeffs = torch.randn(shape[dim], degree + 1).requires_grad_(True)
    g = torch.randn(shape)
    with on_path(path) as launched:
        y = torch.ops.rewrite.row_polynomial(x, coeffs, dim)
        gx, gc = torch.autograd.grad(y, (x, coeffs), g)
    names = {f"row_polynomial{degree}_forward", f"row_polynomial{degree}_backward"}
    assert_launched(path, launched, names, empty=x.numel() == 0)
    assert y.dtype == x.dtype and gx.dtype == x.dtype and gc.dtype == coeffs.dtype
    x64, c64 = x.detach().double().requires_grad_(True), coeffs.detach().double().requires_grad_(True)
    y64 = polynomial64(x64, c64, dim)
    gx64, gc64 = torch.autograd.grad(y64, (x64, c64), g.double())
    assert_matches(y, y64, 1e-5, "y")
    assert_matches(gx, gx64, 1e-5, "grad x")
    assert gc.shape == coeffs.shape
    if x.numel() == 0:
        assert torch.equal(gc, torch.zeros_like(gc))  # a sum over no elements
    else:
        assert_matches(gc, gc64, 1e-5, "grad coeffs")


@interpreted
def test_row_polynomial_half_input_on_the_kernel_path():
    x = torch.randn(2, 4, 3, 7).half().requires_grad_(True)
    coeffs = torch.randn(4, 3).half().requires_grad_(True)
    g = torch.randn(2, 4, 3, 7).half()
    with on_path("kernel") as launched:
        y = torch.ops.rewrite.row_polynomial(x, coeffs, 1)
        gx, gc = torch.autograd.grad(y, (x, coeffs), g)
    assert_launched("kernel", launched, {"row_polynomial2_forward", "row_polynomial2_backward"})
    x64, c64 = x.detach().double().requires_grad_(True), coeffs.detach().double().requires_grad_(True)
    y64 = polynomial64(x64, c64, 1)
    gx64, gc64 = torch.autograd.grad(y64, (x64, c64), g.double())
    assert y.dtype == gx.dtype == gc.dtype == torch.float16
    assert_matches(y, y64, 2e-3, "y")
    assert_matches(gx, gx64, 2e-3, "grad x")
    assert_matches(gc, gc64, 2e-3, "grad coeffs")


@interpreted
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("coeffs_shape", [(2, 3), (3,), (3, 2, 1)], ids=str)
def test_row_polynomial_bad_coeffs_shape_names_the_expected_shape(path, coeffs_shape):
    x = torch.randn(4, 3, 5)
    with on_path(path), pytest.raises(ValueError) as info:
        torch.ops.rewrite.row_polynomial(x, torch.randn(coeffs_shape), 1)
    message = str(info.value)
    assert "[C, degree+1]" in message and "x.shape[1] = 3" in message
    assert str(list(coeffs_shape)) in message


# ---- masked matmul --------------------------------------------------------------------------------


def random_mask(m: int, n: int, kind: str) -> torch.Tensor:
    keep = torch.rand(m, n) < 0.5
    if kind == "bool":
        return keep
    return keep.float() * (torch.rand(m, n) * 2 + 0.25)  # a float mask scales what it keeps


def check_masked_matmul(m: int, k: int, n: int, mask: torch.Tensor, path: str, dtype=torch.float32):
    a = torch.randn(m, k).to(dtype).requires_grad_(True)
    b = torch.randn(k, n).to(dtype).requires_grad_(True)
    g = torch.randn(m, n).to(dtype)
    with on_path(path) as launched:
        out = torch.ops.rewrite.masked_matmul(a, b, mask)
        ga, gb = torch.autograd.grad(out, (a, b), g)
    assert_launched(path, launched, {"masked_matmul"}, empty=out.numel() == 0)
    assert out.shape == (m, n) and out.dtype == dtype
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = (a64 @ b64) * mask.double()
    ra, rb = torch.autograd.grad(ref, (a64, b64), g.double())
    tol = TOLERANCE[dtype]
    assert_matches(out, ref, tol, "out")
    assert_matches(ga, ra, tol, "grad a")
    assert_matches(gb, rb, tol, "grad b")
    return out


@interpreted
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("m,k,n", [(70, 40, 50), (33, 1, 17), (0, 5, 7), (6, 5, 0), (9, 0, 11)], ids=str)
def test_masked_matmul_matches_float64(m, k, n, mask_kind, path):
    # 70 x 50 is not a multiple of the 32 (interpreter) or 64 (GPU) tile; K = 1 and K = 0
    # are single and empty reductions
    check_masked_matmul(m, k, n, random_mask(m, n, mask_kind), path)


@interpreted
def test_masked_matmul_half_on_the_kernel_path():
    check_masked_matmul(70, 40, 50, random_mask(70, 50, "bool"), "kernel", dtype=torch.float16)


@interpreted
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_matmul_all_zero_tiles_are_exactly_zero(mask_kind):
    # rows 0..63 x cols 0..63 are whole tiles for 32- and 64-wide tiles: the kernel skips
    # them and must still write them
    mask = random_mask(96, 80, mask_kind)
    mask[:64, :64] = 0
    out = check_masked_matmul(96, 24, 80, mask, "kernel")
    assert torch.equal(out[:64, :64], torch.zeros(64, 64))
    assert (out[64:] != 0).any() and (out[:, 64:] != 0).any()


@interpreted
@pytest.mark.parametrize("path", PATHS)
def test_masked_matmul_float_mask_gets_its_gradient(path):
    a, b = torch.randn(70, 40), torch.randn(40, 50)
    mask = random_mask(70, 50, "float").requires_grad_(True)
    g = torch.randn(70, 50)
    with on_path(path) as launched:
        out = torch.ops.rewrite.masked_matmul(a, b, mask)
        (gmask,) = torch.autograd.grad(out, mask, g)
    assert_launched(path, launched, {"masked_matmul"})
    mask64 = mask.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad((a.double() @ b.double()) * mask64, mask64, g.double())
    assert_matches(gmask, ref, 1e-5, "grad mask")


@interpreted
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_matmul_on_transposed_operands_and_mask(mask_kind):
    a = torch.randn(40, 70).t()
    b = torch.randn(50, 40).t()
    mask = random_mask(50, 70, mask_kind).t()
    with on_path("kernel") as launched:
        out = torch.ops.rewrite.masked_matmul(a, b, mask)
    assert_launched("kernel", launched, {"masked_matmul"})
    assert_matches(out, (a.double() @ b.double()) * mask.double(), 1e-5, "out")


@pytest.mark.parametrize(
    "a_shape,b_shape,mask_shape",
    [((3, 4), (5, 6), (3, 6)), ((3, 4), (4, 6), (3, 5)), ((3, 4), (4, 6), (6, 3)), ((3, 4, 1), (4, 6), (3, 6))],
    ids=["inner_dims", "mask_columns", "mask_transposed", "a_3d"],
)
def test_masked_matmul_mismatched_shapes_raise_value_error(a_shape, b_shape, mask_shape):
    with pytest.raises(ValueError, match=re.escape(f"{list(a_shape)}, {list(b_shape)}, {list(mask_shape)}")):
        torch.ops.rewrite.masked_matmul(torch.randn(a_shape), torch.randn(b_shape), torch.ones(mask_shape))


# ---- packed2 with an expression of its own ------------------------------------------------------

THRESHOLDS = (-1.0, 0.0, 1.0)
SQUARE = X**2
THRESHOLD_COUNT = sum(sympy.Piecewise((1, X > c), (0, True)) for c in (-1, 0, 1))
# grad * (2 code + 1): each code gets a different slope, and no cancellation in float32
ODD_SLOPE = GRAD * (2 * CODE + 1)


def threshold_codes(x: torch.Tensor) -> torch.Tensor:
    xf = x.reshape(-1).double()
    return sum((xf > c).to(torch.uint8) for c in THRESHOLDS).to(torch.uint8)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 4097])
def test_packed2_with_a_custom_expression(n, dtype):
    x = (torch.randn(n, dtype=torch.float64) * 2).to(dtype)
    if n >= 3:  # the thresholds themselves: "exceeds" is strict
        x[torch.randperm(n)[:3]] = torch.tensor(THRESHOLDS, dtype=dtype)
    y, codes = packed2_forward(x, SQUARE, THRESHOLD_COUNT)
    assert y.dtype == dtype and y.shape == x.shape
    assert codes.dtype == torch.uint8 and codes.shape == ((n + 3) // 4,)
    expected_codes = threshold_codes(x)
    # byte for byte, the unused bits of the last byte included
    assert torch.equal(codes, pack2(expected_codes))
    assert_matches(y, x.double() ** 2, TOLERANCE[dtype], "y")
    g = (torch.randn(n, dtype=torch.float64) + 0.5).to(dtype)
    grad_in = packed2_backward(g, codes, ODD_SLOPE)
    assert grad_in.dtype == dtype and grad_in.shape == (n,)
    assert_matches(grad_in, g.double() * (2 * expected_codes.double() + 1), TOLERANCE[dtype], "grad_in")


@interpreted
def test_packed2_on_a_non_contiguous_2d_input_uses_row_major_order():
    x = (torch.randn(9, 6, dtype=torch.float64) * 2).float().t()
    y, codes = packed2_forward(x, SQUARE, THRESHOLD_COUNT)
    assert torch.equal(codes, pack2(threshold_codes(x.contiguous())))
    assert_matches(y, x.double() ** 2, 1e-6, "y")


# ---- sources ----------------------------------------------------------------------------------------


def row_kernel_sources():
    cases = []
    for name, (forward, backward) in [("layer_norm", layer_norm_kernels()), ("rms_norm", rms_norm_kernels())]:
        for dtype in DTYPES:
            cases.append((f"{name}_forward_{dtype}", forward, (dtype,), dtype))
            cases.append((f"{name}_backward_{dtype}", backward, (dtype, dtype, torch.float32), dtype))
    for degree in (1, 2, 3):
        forward, backward = row_polynomial_kernels(degree)
        coeffs = (torch.float32,) * (degree + 1)
        cases.append((f"poly{degree}_forward", forward, (torch.float32, *coeffs), torch.float32))
        cases.append((f"poly{degree}_backward", backward, (torch.float32, torch.float32, *coeffs), torch.float32))
    return cases


ROW_SOURCES = row_kernel_sources()


def jit_functions(source: str) -> list[str]:
    """Names of the functions decorated with triton.jit in ``source`` (which must parse)."""
    tree = ast.parse(source)
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list)
    ]


@pytest.mark.parametrize("kernel,input_dtypes,output_dtype", [c[1:] for c in ROW_SOURCES],
                         ids=[c[0] for c in ROW_SOURCES])  # fmt: skip
def test_row_kernel_sources_are_triton_python(kernel, input_dtypes, output_dtype):
    source = kernel.source(input_dtypes, output_dtype)
    assert "@triton.jit" in source
    compile(source, kernel.name, "exec")
    assert jit_functions(source) == [kernel.name]


def _loops(source: str) -> list[str]:
    """The bodies of the kernel's column loops (top-level ``for start in range`` blocks)."""
    body = source.split("def ", 1)[1]
    return [block.split("\n    tl.store(")[0] for block in re.split(r"\n    for start in range\(", body)[1:]]


def test_layer_norm_backward_computes_both_row_sums_in_one_pass():
    forward, backward = layer_norm_kernels()
    source = backward.source((torch.float32, torch.float32, torch.float32), torch.float32)
    loops = _loops(source)
    summing = [loop for loop in loops if "acc_" in loop]
    assert len(summing) == 1, f"{len(summing)} passes accumulate row sums"
    accumulators = set(re.findall(r"(acc_\w+) \+=", summing[0]))
    assert accumulators == {"acc_sg", "acc_sgy"}
    assert len(loops) == 2  # the sums, then the output


def test_template_sources_for_packed2_and_masked_matmul_are_triton_python():
    sources = {
        "packed2_forward": packed2_forward_source(SQUARE, THRESHOLD_COUNT, torch.float32),
        "packed2_backward": packed2_backward_source(ODD_SLOPE, torch.float16),
        "masked_matmul": masked_matmul_source(torch.float32, torch.uint8),
    }
    for name, source in sources.items():
        assert "@triton.jit" in source, name
        assert jit_functions(source) == [name]
