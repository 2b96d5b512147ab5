"""The custom ops: exact forward, backward by the documented formulas, fake kernels."""

import pytest
import torch
import torch.nn.functional as F

import rewrite  # noqa: F401  (registers torch.ops.rewrite)
from rewrite.ops.ms_norm import rms_eps
from rewrite.ops.step_activation import REGELU2, RESILU2, pack2, step_codes, unpack2

STEP_OPS = [
    ("regelu2", REGELU2, lambda x: F.gelu(x), {}),
    ("regelu2", REGELU2, lambda x: F.gelu(x, approximate="tanh"), {"approximate": "tanh"}),
    ("resilu2", RESILU2, F.silu, {}),
]


@pytest.mark.parametrize("a,c", [(REGELU2.a, REGELU2.c), (RESILU2.a, RESILU2.c)])
def test_constants_match_the_activation_at_infinity(a, c):
    # h(x) = sum a_i max(x - c_i, 0): slope 1 and offset 0 for large x, like GELU and SiLU.
    assert sum(a) == pytest.approx(1.0, abs=1e-12)
    assert sum(ai * ci for ai, ci in zip(a, c)) == pytest.approx(0.0, abs=1e-12)
    assert list(c) == sorted(c)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023, 4096 + 3])
def test_pack_unpack_round_trip_and_layout(n):
    codes = torch.randint(0, 4, (n,), dtype=torch.uint8)
    packed = pack2(codes)
    assert packed.shape == ((n + 3) // 4,) and packed.dtype == torch.uint8
    assert torch.equal(unpack2(packed, n), codes)
    for k in range(min(n, 8)):  # element k of each group of four sits in bits 2k..2k+1
        assert (int(packed[k // 4]) >> (2 * (k % 4))) & 3 == int(codes[k])


def test_step_codes_count_thresholds_exceeded():
    c = REGELU2.c
    x = torch.tensor([c[0] - 1, c[0], (c[0] + c[1]) / 2, c[1] + 1e-3, (c[1] + c[2]) / 2, c[2] + 1])
    assert step_codes(x, c).tolist() == [0, 0, 1, 2, 2, 3]


@pytest.mark.parametrize("name,approx,reference,kwargs", STEP_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_step_activation_forward_is_exact_and_backward_is_step_derivative(name, approx, reference, kwargs, dtype):
    x = (torch.randn(7, 33) * 3).to(dtype).requires_grad_(True)
    y, codes = getattr(torch.ops.rewrite, name)(x, **kwargs)
    assert torch.equal(y, reference(x))
    assert codes.shape == ((x.numel() + 3) // 4,)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    expected = (g.double() * approx.derivative(x.detach())).to(dtype)
    torch.testing.assert_close(gx, expected, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-3 if dtype == torch.float16 else 1e-7)


def test_step_activation_on_non_contiguous_input():
    base = torch.randn(8, 6, requires_grad=True)
    x = base.t()
    y, _ = torch.ops.rewrite.resilu2(x)
    assert torch.equal(y, F.silu(x))
    g = torch.randn(6, 8)
    (gb,) = torch.autograd.grad(y, base, g)
    torch.testing.assert_close(gb, (g * RESILU2.derivative(x.detach()).float()).t())


def test_regelu2_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        torch.ops.rewrite.regelu2(torch.randn(4), approximate="erf")


@pytest.mark.parametrize("shape,normalized", [((4, 16), [16]), ((2, 3, 10), [10]), ((2, 3, 4, 5), [4, 5])])
def test_ms_layer_norm_matches_layer_norm(shape, normalized):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y, rstd = torch.ops.rewrite.ms_layer_norm(x, normalized, 1e-5)
    ref = F.layer_norm(x, normalized, eps=1e-5)
    torch.testing.assert_close(y, ref)
    assert rstd.shape == torch.Size([*shape[: len(shape) - len(normalized)], *[1] * len(normalized)])
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    torch.autograd.gradcheck(lambda t: torch.ops.rewrite.ms_layer_norm(t, normalized, 1e-5)[0], (x,))


@pytest.mark.parametrize("eps", [1e-6, None])
def test_ms_rms_norm_matches_rms_norm(eps):
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    y, _ = torch.ops.rewrite.ms_rms_norm(x, [12], eps)
    ref = F.rms_norm(x, (12,), eps=eps)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    torch.autograd.gradcheck(lambda t: torch.ops.rewrite.ms_rms_norm(t, [12], eps)[0], (x,))


def test_rms_eps_default_is_that_of_aten():
    x = torch.randn(4, 8, dtype=torch.float16) * 1e-3
    ref = F.rms_norm(x, (8,))
    y, _ = torch.ops.rewrite.ms_rms_norm(x, [8], None)
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)
    assert rms_eps(None, torch.float16) == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("op", ["ms_layer_norm", "ms_rms_norm"])
def test_ms_norm_half_precision(op):
    x = torch.randn(6, 32, dtype=torch.float16, requires_grad=True)
    y, rstd = getattr(torch.ops.rewrite, op)(x, [32], 1e-5)
    assert y.dtype == torch.float16 and rstd.dtype == torch.float32
    xr = x.detach().float().requires_grad_(True)
    ref = F.layer_norm(xr, (32,), eps=1e-5) if op == "ms_layer_norm" else F.rms_norm(xr, (32,), eps=1e-5)
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(ref)
    gx = torch.autograd.grad(y, x, g.half())[0]
    torch.testing.assert_close(gx.float(), torch.autograd.grad(ref, xr, g)[0], rtol=2e-2, atol=2e-2)


def test_ms_norm_saves_only_its_output_and_rstd():
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, rstd = torch.ops.rewrite.ms_layer_norm(x, [64], 1e-5)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {y.untyped_storage().data_ptr(), rstd.untyped_storage().data_ptr()}


@pytest.mark.parametrize(
    "op,args",
    [
        ("regelu2", (torch.randn(5, 3, requires_grad=True),)),
        ("resilu2", (torch.randn(2, 7, requires_grad=True),)),
        ("ms_layer_norm", (torch.randn(5, 3, requires_grad=True), [3], 1e-5)),
        ("ms_rms_norm", (torch.randn(5, 3, requires_grad=True), [3], None)),
        ("step2_backward", (torch.randn(5, 3), torch.randint(0, 255, (4,), dtype=torch.uint8), REGELU2.slopes)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.rewrite, op).default, args)


@pytest.mark.parametrize(
    "op,make_args",
    [
        ("regelu2", lambda: (torch.randn(6, 5).t().requires_grad_(),)),
        ("resilu2", lambda: (torch.randn(4, 9, 3)[:, ::2].requires_grad_(),)),
        ("ms_layer_norm", lambda: (torch.randn(7, 4).t().requires_grad_(), [7], 1e-5)),
        ("ms_rms_norm", lambda: (torch.randn(2, 8, 3).transpose(1, 2).requires_grad_(), [8], None)),
        ("step2_backward", lambda: (torch.randn(5, 3).t(), torch.randint(0, 255, (4,), dtype=torch.uint8), REGELU2.slopes)),
    ],
)
def test_opcheck_on_non_contiguous_inputs(op, make_args):
    # The fake kernels must promise the layouts the real ones produce (contiguous outputs).
    torch.library.opcheck(getattr(torch.ops.rewrite, op).default, make_args())


@pytest.mark.parametrize("op", ["ms_layer_norm", "ms_rms_norm"])
def test_ms_norm_under_autocast_gives_the_autocast_dtype_and_shares_it(op):
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(8, 16, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, rstd = getattr(torch.ops.rewrite, op)(x, [16], 1e-5)
            out = F.linear(y, weight)
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and out.dtype == torch.bfloat16
    activations = [t for t in saved if t.shape == y.shape]
    assert {t.untyped_storage().data_ptr() for t in activations} == {y.untyped_storage().data_ptr()}
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    xr = x.detach().clone().requires_grad_(True)
    ref = F.layer_norm(xr, (16,), eps=1e-5) if op == "ms_layer_norm" else F.rms_norm(xr, (16,), eps=1e-5)
    F.linear(ref, weight.detach()).sum().backward()
    assert ((x.grad - xr.grad).norm() / xr.grad.norm()).item() < 2e-2
