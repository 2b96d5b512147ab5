"""The 2-bit activations' kernels (codegen's packed2 template filled with the activation's
expressions) against the PyTorch reference: on the CPU under TRITON_INTERPRET=1, on a GPU
natively (tests marked gpu)."""

import os

import pytest
import torch
import torch.nn.functional as F

import rewrite  # noqa: F401
from rewrite.ops import use_triton_on_cpu
from rewrite.ops.step_activation import (
    REGELU2,
    RESILU2,
    pack2,
    step_codes,
    template_expressions,
    template_gradient,
)

pytest.importorskip("triton")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

SIZES = [1, 3, 4, 5, 1000, 1024, 4097]
CASES = [("regelu2", "none", REGELU2), ("regelu2", "tanh", REGELU2), ("resilu2", "none", RESILU2)]


def _reference(activation, approximate, x):
    y = F.gelu(x, approximate=approximate) if activation == "regelu2" else F.silu(x)
    approx = REGELU2 if activation == "regelu2" else RESILU2
    return y, pack2(step_codes(x.reshape(-1), approx.c))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def step2_forward(x, activation, approximate):
    from codegen.templates import packed2_forward

    return packed2_forward(x, *template_expressions(activation, approximate))


def step2_backward(g, codes, slopes):
    from codegen.templates import packed2_backward

    return packed2_backward(g, codes, template_gradient(tuple(slopes)))


def _check_kernels(device, activation, approximate, approx, n, dtype):
    x = (torch.randn(n, device=device) * 4).to(dtype)
    ref_y, ref_codes = _reference(activation, approximate, x.cpu())
    y, codes = step2_forward(x, activation, approximate)
    assert torch.equal(codes.cpu(), ref_codes)
    assert _rel(y.cpu(), ref_y) < (1e-6 if dtype == torch.float32 else 1e-3)
    g = torch.randn(n, device=device).to(dtype)
    gx = step2_backward(g, codes, approx.slopes)
    expected = (g.cpu().double() * approx.derivative(x.cpu())).to(dtype)
    assert _rel(gx.cpu(), expected) < (1e-6 if dtype == torch.float32 else 1e-3)


@interpreted
@pytest.mark.parametrize("activation,approximate,approx", CASES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_reference_interpreted(activation, approximate, approx, n, dtype):
    _check_kernels("cpu", activation, approximate, approx, n, dtype)


@interpreted
def test_kernels_handle_empty_tensors():
    y, codes = step2_forward(torch.empty(0), "regelu2", "none")
    assert y.shape == (0,) and codes.shape == (0,)
    assert step2_backward(torch.empty(0), codes, REGELU2.slopes).shape == (0,)


@interpreted
@pytest.mark.parametrize("activation,kwargs", [("regelu2", {}), ("regelu2", {"approximate": "tanh"}), ("resilu2", {})])
def test_ops_through_triton_path_interpreted(activation, kwargs):
    op = getattr(torch.ops.rewrite, activation)
    x = torch.randn(3, 5, 7) * 3
    ref_y, ref_codes = op(x, **kwargs)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    ref_gx = torch.autograd.grad(op(xr, **kwargs)[0], xr, g)[0]
    with use_triton_on_cpu():
        xt = x.clone().requires_grad_(True)
        y, codes = op(xt, **kwargs)
        gx = torch.autograd.grad(y, xt, g)[0]
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(gx, ref_gx)


def test_use_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with use_triton_on_cpu():
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("activation,approximate,approx", CASES)
@pytest.mark.parametrize("n", SIZES + [1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_match_reference_on_gpu(activation, approximate, approx, n, dtype):
    _check_kernels("cuda", activation, approximate, approx, n, dtype)
