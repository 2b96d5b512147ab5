"""codegen.pointwise: emitted Triton kernels (forward and backward) against a float64 eager
reference, on fresh inputs of another shape than the kernel was built from. Without CUDA the
kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import codegen
import rewrite  # noqa: F401 - registers torch.ops.rewrite.pointwise
from codegen import cache

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)"
)

# ||out - ref|| / ||ref|| against float64. float32: the kernels compute in float32, so a region
# of a few dozen ops lands near 1e-7; 1e-5 leaves room for the interpreter's and the GPU's
# transcendental functions. float16: every input, output and stored gradient is rounded to
# float16 (unit roundoff 2**-11 = 4.9e-4, about 3e-4 in the norm) while the arithmetic runs in
# float32, so the error is about one final rounding; 2e-3 allows a few such roundings.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _private_kernel_cache(tmp_path_factory):
    """Kernels go to a fresh directory: the tests do not depend on what ~/.cache holds."""
    cache.set_cache_dir(tmp_path_factory.mktemp("kernels"))
    yield
    cache.set_cache_dir(None)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Every element compared: same shape and size, finite wherever the reference is, and
    within ``tol`` in the norm; the max-norm check keeps one wrong element from hiding in a
    large norm."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.numel() == ref.numel()
    if out.numel() == 0:
        return
    finite = torch.isfinite(ref)
    assert torch.isfinite(out)[finite].all(), f"{what}: NaN/inf where the reference is finite"
    out, ref = out[finite].double(), ref[finite].double()
    err = rel_error(out, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"
    worst = (out - ref).abs().max().item()
    assert worst <= 10 * tol * ref.abs().max().item() + 1e-30, f"{what}: worst element off by {worst:.3g}"


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def upcast(inputs):
    return [t.detach().double().requires_grad_(True) if t.is_floating_point() else t for t in inputs]


def leaves(inputs):
    """Fresh leaves that keep each input's strides (a transposed input stays transposed)."""
    return [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]


# ---- the regions ---------------------------------------------------------------------------------


def _randn(*shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _positive(*shape, dtype):
    return (torch.rand(shape, dtype=torch.float64) + 0.25).to(dtype)


def _away_from_zero(*shape, dtype):
    sign = torch.randint(0, 2, shape, dtype=torch.float64) * 2 - 1
    return (sign * (torch.rand(shape, dtype=torch.float64) + 0.5)).to(dtype)


def _nonzero_ints(*shape):
    j = torch.randint(1, 8, shape, dtype=torch.int32)
    return torch.where(torch.rand(shape) < 0.5, -j, j)


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    make: Callable  # (dtype, n, c) -> inputs; n, c: leading and trailing dims
    # Autograd rounds a gradient to float16 where the forward value was float16 (the backward
    # of ``.float()``); the emitted backward keeps it in the compute type. Such gradients
    # agree with eager only to float16's tolerance.
    gradient_through_float16: bool = False

    def __repr__(self):
        return self.name


CASES = [
    Case("bias_trailing_broadcast", lambda x, b: torch.tanh(x * 0.5 + b),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(c, dtype=dt))),
    Case("leading_broadcast", lambda x, s: x * s - s * 0.25,
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(n, 1, dtype=dt))),
    Case("scalar_tensor_input", lambda x, s: x * s + s * s - 1,
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(dtype=dt))),
    Case("python_constants", lambda x: x * 0.1 + 3 - x / 7.0 + 2.0**x,
         lambda dt, n, c: (_randn(n, c, dtype=dt),)),
    Case("casts", lambda x: (x.half().float() * 2 + x.to(torch.int32) * 0.5).to(x.dtype),
         lambda dt, n, c: (_randn(n, c, dtype=dt, scale=4),), gradient_through_float16=True),
    Case("compare_where", lambda x, y: torch.where(x > y, x * y, y - 1.5) + (x <= 0.5).to(x.dtype),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(n, c, dtype=dt))),
    Case("exp_log_sqrt_rsqrt", lambda x, p: torch.exp(x) * torch.log(p) + torch.sqrt(p) - torch.rsqrt(p),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _positive(n, c, dtype=dt))),
    Case("sin_cos_tanh_erf_sigmoid",
         lambda x, y: torch.sin(x) * torch.cos(y) + torch.tanh(x) - torch.erf(y) * torch.sigmoid(x),
         lambda dt, n, c: (_randn(n, c, dtype=dt, scale=2), _randn(n, c, dtype=dt, scale=2))),
    Case("gelu_exact", lambda x: F.gelu(x), lambda dt, n, c: (_randn(n, c, dtype=dt, scale=3),)),
    Case("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), lambda dt, n, c: (_randn(n, c, dtype=dt, scale=3),)),
    Case("silu", lambda x: F.silu(x), lambda dt, n, c: (_randn(n, c, dtype=dt, scale=3),)),
    Case("relu_clamp_max_min_leaky_hardtanh",
         lambda x, y: F.relu(x) + x.clamp(-0.5, 0.75) + torch.maximum(x, y) - 0.5 * torch.minimum(x, y)
         + F.leaky_relu(y, 0.1) + F.hardtanh(x * 2),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(n, c, dtype=dt))),
    Case("pow_integer_fractional_tensor",
         lambda x, p, y: x**2 + 0.5 * x**3 + p**1.5 - p**0.25 + p**-2 + torch.pow(p, y),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _positive(n, c, dtype=dt), _randn(n, c, dtype=dt))),
    Case("division", lambda x, q: x / q + 3.0 / q - x / 4.0,
         lambda dt, n, c: (_randn(n, c, dtype=dt), _away_from_zero(n, c, dtype=dt))),
    Case("transposed_input", lambda x, yt: x * yt + torch.sigmoid(yt),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(c, n, dtype=dt).t())),
    Case("view_of_input_inside_region", lambda x, b: x * b.unsqueeze(-1) + b.unsqueeze(-1),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(n, dtype=dt))),
    Case("logical_ops_on_bool_masks",
         lambda x, m1, m2: torch.where(torch.logical_xor(m1, m2), x, -x)
         + 2 * torch.logical_and(m1, torch.logical_not(m2)).to(x.dtype)
         - torch.logical_or(m1, x > 0).to(x.dtype),
         lambda dt, n, c: (_randn(n, c, dtype=dt), torch.rand(n, c) < 0.5, torch.rand(n, c) < 0.5)),
    Case("int_floor_divide_remainder_negative",
         lambda x, i, j: x * torch.remainder(i, j) + torch.floor_divide(i, j) - x * (i // 3) + i % -4,
         lambda dt, n, c: (_randn(n, c, dtype=dt), torch.randint(-50, 50, (n, c), dtype=torch.int32),
                           _nonzero_ints(n, c))),
    Case("two_outputs", lambda x, y: (x * y, torch.exp(x) - y),
         lambda dt, n, c: (_randn(n, c, dtype=dt), _randn(n, c, dtype=dt))),
]  # fmt: skip

EXAMPLE_DIMS = (3, 8)
FRESH_DIMS = (9, 40)  # another shape: the kernel must not depend on the examples' sizes


def build(case: Case, dtype: torch.dtype):
    return codegen.pointwise(case.fn, *case.make(dtype, *EXAMPLE_DIMS))


def test_enough_distinct_regions():
    assert len({c.name for c in CASES}) == len(CASES) >= 15


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_matches_float64_eager(case, dtype):
    kernel = build(case, dtype)
    inputs = case.make(dtype, *FRESH_DIMS)
    with codegen.use_triton_on_cpu():
        outs = as_tuple(kernel(*inputs))
    eager = as_tuple(case.fn(*inputs))
    refs = as_tuple(case.fn(*[t.double() if t.is_floating_point() else t for t in inputs]))
    assert len(outs) == len(eager)
    for k, (out, e, ref) in enumerate(zip(outs, eager, refs)):
        assert out.dtype == e.dtype and out.shape == e.shape
        assert_matches(out, ref, TOLERANCE[out.dtype], f"output {k}")


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_backward_matches_float64_autograd(case, dtype):
    kernel = build(case, dtype)
    inputs = leaves(case.make(dtype, *FRESH_DIMS))
    floats = [t for t in inputs if t.is_floating_point()]
    with codegen.use_triton_on_cpu():
        outs = as_tuple(kernel(*inputs))
        grad_outs = [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, floats, grad_outs)
    inputs64 = upcast(inputs)
    outs64 = as_tuple(case.fn(*inputs64))
    refs = torch.autograd.grad(outs64, [t for t in inputs64 if t.is_floating_point()],
                               [g.to(o.dtype) for g, o in zip(grad_outs, outs64)])  # fmt: skip
    for k, (x, g, ref) in enumerate(zip(floats, grads, refs)):
        # broadcast inputs get their gradient summed back to their own shape
        assert g.shape == x.shape and g.dtype == x.dtype, f"gradient {k}"
        tol = TOLERANCE[torch.float16 if case.gradient_through_float16 else x.dtype]
        assert_matches(g, ref, tol, f"gradient {k}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_path_equals_eager_exactly(case):
    kernel = build(case, torch.float32)
    inputs = case.make(torch.float32, *FRESH_DIMS)
    for out, e in zip(as_tuple(kernel(*inputs)), as_tuple(case.fn(*inputs))):
        assert out.dtype == e.dtype
        assert torch.equal(out, e)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_path_backward_matches_eager(case):
    # without kernels the backward evaluates the backward kernel's expressions with PyTorch
    # ops: equal to eager autograd up to float32 rounding
    kernel = build(case, torch.float32)
    inputs = leaves(case.make(torch.float32, *FRESH_DIMS))
    floats = [t for t in inputs if t.is_floating_point()]
    outs = as_tuple(kernel(*inputs))
    grad_outs = [torch.randn(o.shape) for o in outs]
    grads = torch.autograd.grad(outs, floats, grad_outs)
    eager = torch.autograd.grad(as_tuple(case.fn(*inputs)), floats, grad_outs)
    for k, (g, e) in enumerate(zip(grads, eager)):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.isfinite(g).all() or not torch.isfinite(e).all()
        # eager rounds the gradient to float16 at the backward of .half(); the kernel's math does not
        tolerance = 2e-3 if case.gradient_through_float16 else 1e-5
        assert rel_error(g, e) < tolerance, f"gradient {k}: relative error {rel_error(g, e):.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_sources_are_triton_python(case, dtype):
    kernel = build(case, dtype)
    for source in (kernel.source, kernel.backward_source):
        assert "@triton.jit" in source
        compile(source, "k", "exec")
    assert "def pointwise_forward(" in kernel.source
    assert "def pointwise_backward(" in kernel.backward_source


# ---- sizes -----------------------------------------------------------------------------------------


def _gated(x, y):
    return x * torch.sigmoid(y) + 1


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 17, 1000, 4097])
def test_sizes_not_multiple_of_block(n, dtype):
    kernel = codegen.pointwise(_gated, _randn(5, dtype=dtype), _randn(5, dtype=dtype))
    x, y = leaves([_randn(n, dtype=dtype, scale=2), _randn(n, dtype=dtype, scale=2)])
    with codegen.use_triton_on_cpu():
        out = kernel(x, y)
        g = _randn(n, dtype=dtype)
        gx, gy = torch.autograd.grad(out, (x, y), g)
    assert out.shape == (n,) and out.dtype == dtype
    x64, y64 = upcast([x, y])
    ref = _gated(x64, y64)
    assert_matches(out, ref, TOLERANCE[dtype], "output")
    rx, ry = torch.autograd.grad(ref, (x64, y64), g.double())
    assert gx.shape == gy.shape == (n,)
    assert_matches(gx, rx, TOLERANCE[dtype], "grad x")
    assert_matches(gy, ry, TOLERANCE[dtype], "grad y")


@interpreted
@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (1, 8)])
def test_empty_and_one_row_with_broadcast_bias(shape):
    kernel = codegen.pointwise(lambda x, b: F.silu(x + b), torch.randn(3, 8), torch.randn(8))
    x, b = leaves([torch.randn(shape), torch.randn(shape[-1])])
    with codegen.use_triton_on_cpu():
        out = kernel(x, b)
        g = torch.randn(out.shape)
        gx, gb = torch.autograd.grad(out, (x, b), g)
    x64, b64 = upcast([x, b])
    ref = F.silu(x64 + b64)
    rx, rb = torch.autograd.grad(ref, (x64, b64), g.double())
    assert out.shape == shape and gx.shape == shape and gb.shape == (shape[-1],)
    assert_matches(out, ref, 1e-5, "output")
    assert_matches(gx, rx, 1e-5, "grad x")
    if shape[0] == 0:
        assert torch.equal(gb, torch.zeros(shape[-1]))  # a sum over no rows
    else:
        assert_matches(gb, rb, 1e-5, "grad b")


# ---- float64 ----------------------------------------------------------------------------------------


def _float64_region(x, y):
    return torch.exp(x * 0.1) + torch.sin(y) / 3.0 - 1e-3 * x * y + torch.tanh(x) ** 2


def bare_float_literals(source: str, kernel_name: str) -> list[str]:
    """Float literals in the kernel's body that are not typed float64. The CPU interpreter
    computes them in float64 anyway (numpy), so only the source shows the difference."""
    body = source.split(f"def {kernel_name}(")[1]
    body = re.sub(r"tl\.full\(\[\], [^,]+, tl\.float64\)", "", body)
    return re.findall(r"(?<![\w.])(?:\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+)", body)


@interpreted
def test_float64_region_types_its_literals_and_is_exact():
    kernel = codegen.pointwise(_float64_region, torch.randn(3, 8, dtype=torch.float64),
                               torch.randn(3, 8, dtype=torch.float64))  # fmt: skip
    # a bare 0.1 is a float32 constant in Triton: rounded before it meets the float64 tensor
    assert "tl.float64" in kernel.source
    assert bare_float_literals(kernel.source, "pointwise_forward") == []
    assert bare_float_literals(kernel.backward_source, "pointwise_backward") == []
    x, y = leaves([torch.randn(9, 40, dtype=torch.float64), torch.randn(9, 40, dtype=torch.float64)])
    with codegen.use_triton_on_cpu():
        out = kernel(x, y)
        g = torch.randn(out.shape, dtype=torch.float64)
        gx, gy = torch.autograd.grad(out, (x, y), g)
    ref = _float64_region(x, y)
    rx, ry = torch.autograd.grad(ref, (x, y), g)
    assert out.dtype == torch.float64
    assert_matches(out, ref, 1e-12, "output")
    assert_matches(gx, rx, 1e-12, "grad x")
    assert_matches(gy, ry, 1e-12, "grad y")


# ---- integer semantics of the printer ---------------------------------------------------------------


def _integer_ops(a, b):
    return (
        torch.floor_divide(a, b),
        torch.remainder(a, b),
        torch.fmod(a, b),
        torch.div(a, b, rounding_mode="trunc"),
        torch.div(a, b, rounding_mode="floor"),
        a // -3,
        a % 3,
        a % -3,
    )


def _sign_grid(dtype, offset=0.0):
    """Every sign combination of dividend and divisor, including exact multiples and 0."""
    a = torch.arange(-7, 8, dtype=torch.float64) + offset
    b = torch.tensor([-3, -2, -1, 1, 2, 3], dtype=torch.float64)
    a, b = torch.meshgrid(a, b, indexing="ij")
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


@interpreted
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_integer_floor_division_and_remainder_follow_pytorch(dtype):
    a, b = _sign_grid(dtype)
    kernel = codegen.pointwise(_integer_ops, a, b)
    with codegen.use_triton_on_cpu():
        outs = kernel(a, b)
    for k, (out, e) in enumerate(zip(outs, _integer_ops(a, b))):
        assert out.dtype == e.dtype == dtype
        assert torch.equal(out, e), f"output {k}: {out[(out != e)].tolist()} != {e[(out != e)].tolist()}"


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_floor_division_and_remainder_follow_pytorch(dtype):
    # half-integers over small integers: every result is exact, and no quotient is within
    # rounding of an integer, so the kernel must equal eager bit for bit
    a, b = _sign_grid(dtype, offset=0.5)
    kernel = codegen.pointwise(_integer_ops, a, b)
    with codegen.use_triton_on_cpu():
        outs = kernel(a, b)
    for k, (out, e) in enumerate(zip(outs, _integer_ops(a, b))):
        assert out.dtype == e.dtype == dtype
        assert torch.equal(out, e), f"output {k}: {out[(out != e)].tolist()} != {e[(out != e)].tolist()}"


# ---- what the emitter refuses ------------------------------------------------------------------------


_x34 = torch.randn(3, 4)

REFUSED = [
    ("reduction", lambda x: x * x.sum(), (_x34,), ["sum_1", "aten.sum"]),
    ("matmul", lambda x, y: x @ y, (_x34, torch.randn(4, 5)), ["mm", "aten.mm"]),
    ("complex_input", lambda x: x * 2, (torch.randn(4, dtype=torch.complex64),), ["x_1", "complex64"]),
    ("transpose_of_computed", lambda x: (x * 2).t(), (_x34,), ["'t'", "aten.t"]),
    ("unsqueeze_of_computed", lambda x: (x * 2)[:, None], (_x34,), ["unsqueeze", "aten.unsqueeze"]),
]


@pytest.mark.parametrize("fn,examples,named", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsupported_regions_name_the_node(fn, examples, named):
    with pytest.raises(codegen.UnsupportedRegion) as info:
        codegen.pointwise(fn, *examples)
    for text in named:
        assert text in str(info.value)


@interpreted
def test_output_smaller_than_iteration_shape_is_refused():
    # refused when the kernel is made (the examples' shapes show it), and at launch for
    # inputs where it only then shows
    x, b = torch.randn(3, 4), torch.randn(4)
    with pytest.raises(codegen.UnsupportedRegion, match="'mul'"):
        codegen.pointwise(lambda x, b: (x + b, b * 2), x, b)
    kernel = codegen.pointwise(lambda x, b: (x + b, b * 2), torch.randn(4), torch.randn(4))
    with codegen.use_triton_on_cpu(), pytest.raises(codegen.UnsupportedRegion, match="'mul'"):
        kernel(x, b)


@interpreted
@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is refused only by the CPU interpreter")
@pytest.mark.parametrize("bf16_position", [0, 1])
def test_bfloat16_is_refused_by_the_interpreter(bf16_position):
    # whichever input is bf16: the op must not silently fall back to the reference
    inputs = [torch.randn(3, 4), torch.randn(3, 4)]
    inputs[bf16_position] = inputs[bf16_position].bfloat16()
    kernel = codegen.pointwise(lambda x, y: x * y + 1, *inputs)
    with codegen.use_triton_on_cpu(), pytest.raises(codegen.UnsupportedRegion, match="bfloat16"):
        kernel(*inputs)


def test_wrong_dtype_names_the_input():
    kernel = codegen.pointwise(lambda x, y: x * y, torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match=r"input 1 \(y_1\).*float16"):
        kernel(torch.randn(3), torch.randn(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="takes 2 tensors"):
        kernel(torch.randn(3))


def test_one_tensor_given_as_two_examples_stays_two_inputs():
    # make_fx maps one tensor object to one proxy: the region must still read each argument
    example = torch.randn(8)
    kernel = codegen.pointwise(lambda x, y: x * 3 - y, example, example)
    x, y = torch.randn(8), torch.randn(8)
    assert torch.equal(kernel(x, y), x * 3 - y)


# ---- export -------------------------------------------------------------------------------------------


def _block_fn(x):
    return F.gelu(x) * 2 + 1


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = codegen.pointwise(_block_fn, torch.randn(4, 8))

    def forward(self, x):
        return self.kernel(x)


def test_export_keeps_the_pointwise_op():
    x = torch.randn(4, 8)
    ep = torch.export.export(_Block(), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewrite.pointwise.default in targets
    fresh = torch.randn(4, 8)
    assert torch.equal(ep.module()(fresh), _block_fn(fresh))


@interpreted
@pytest.mark.parametrize("use_kernels", [False, True])
def test_pow_with_a_tensor_exponent_has_autograds_gradient_at_zero(use_kernels):
    # sympy's e * x**e / x and x**e * log(x) are NaN at x = 0; autograd masks them to 0
    x = torch.tensor([0.0, 0.0, 2.0], requires_grad=True)
    e = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
    kernel = codegen.pointwise(lambda x, e: x**e, x.detach(), e.detach())
    with codegen.use_triton_on_cpu(use_kernels):
        grads = torch.autograd.grad(kernel(x, e).sum(), (x, e))
    expected = torch.autograd.grad((x**e).sum(), (x, e))
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@interpreted
def test_round_keeps_the_sign_of_zero():
    x = torch.tensor([-0.5, -0.3, -2.5, 0.5, 1.5])
    kernel = codegen.pointwise(torch.round, x)
    with codegen.use_triton_on_cpu():
        out = kernel(x)
    assert torch.equal(out, torch.round(x))
    assert torch.equal(torch.signbit(out), torch.signbit(torch.round(x)))
