"""The emitted kernels on a GPU, natively (not interpreted): run on the lent GPU machine with
``pytest -m gpu tests/codegen``; skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

import codegen
import rewrite  # noqa: F401 - registers torch.ops.rewrite.*

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # METHOD.md, "Correct first"

REGIONS = {
    "bias_gelu_residual": (lambda x, b, r: F.gelu(x + b) + r, lambda n: [(n // 64, 64), (64,), (n // 64, 64)]),
    "poly2": (lambda x: 0.125 * x * x + 0.5 * x + 0.25, lambda n: [(n,)]),
    "where_tanh_sigmoid": (
        lambda x, y: torch.where(x > y, torch.tanh(x), torch.sigmoid(y) * y),
        lambda n: [(n,), (n,)],
    ),
    "transposed": (lambda x, y: x * y.t() + 1.5, lambda n: [(64, n // 64), (n // 64, 64)]),
}


def _rel(out, ref) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", sorted(REGIONS))
@pytest.mark.parametrize("n", [64, 4096 * 64 + 64, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pointwise_regions_forward_and_backward(name, n, dtype):
    fn, shapes = REGIONS[name]
    examples = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes(64 * 4)]
    kernel = codegen.pointwise(fn, *examples)
    assert "triton.autotune" in kernel.source  # block sizes are tuned on a GPU
    inputs = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes(n)]
    out = kernel(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = fn(*ref_inputs)
    assert _rel(out, ref) < TOLERANCE[dtype]
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, g)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert _rel(got, want) < TOLERANCE[dtype]


def test_compiled_module_with_a_pointwise_op_equals_eager():
    fn = lambda x, b: F.silu(x * 2 + b)  # noqa: E731
    x, b = torch.randn(256, 128, device="cuda"), torch.randn(128, device="cuda")
    kernel = codegen.pointwise(fn, x, b)

    class M(torch.nn.Module):
        def forward(self, x, b):
            return kernel(x, b) * 3

    compiled = torch.compile(M())
    assert _rel(compiled(x, b), fn(x.double(), b.double()) * 3) < 1e-5


@pytest.mark.parametrize("op", ["ms_layer_norm", "ms_rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_row_kernels(op, dtype):
    x = (torch.randn(33, 4096, device="cuda") * 3 + 1).to(dtype).requires_grad_()
    fn = getattr(torch.ops.rewrite, op)
    y, rstd = fn(x, [4096], 1e-5)
    xd = x.detach().double().requires_grad_()
    if op == "ms_layer_norm":
        ref = F.layer_norm(xd, [4096], eps=1e-5)
    else:
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(y, ref) < TOLERANCE[dtype]
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    (gref,) = torch.autograd.grad(ref, xd, g)
    assert _rel(gx, gref) < TOLERANCE[dtype]


def test_row_polynomial_and_masked_matmul():
    x = torch.randn(8, 16, 32, 32, device="cuda", requires_grad=True)
    coeffs = torch.randn(16, 3, device="cuda", requires_grad=True)
    y = torch.ops.rewrite.row_polynomial(x, coeffs, 1)
    c = coeffs.double()[:, :, None, None]
    ref = c[:, 0] + c[:, 1] * x.double() + c[:, 2] * x.double() ** 2
    assert _rel(y, ref) < 1e-5
    a, b = torch.randn(300, 200, device="cuda"), torch.randn(200, 500, device="cuda")
    mask = torch.rand(300, 500, device="cuda") > 0.9
    out = torch.ops.rewrite.masked_matmul(a, b, mask)
    assert _rel(out, (a.double() @ b.double()) * mask) < 1e-5
