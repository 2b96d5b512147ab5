"""Regions passes mark for codegen: growing a region over elementwise ops without closing a
cycle, and ``optimize(..., codegen=True)`` replacing marked regions by ``rewrite.pointwise``
ops that compute what the original model computes (reference path and, under the Triton
interpreter, the emitted kernels), save less for backward, chain with approx_bp, save and
load, list their kernels and compile with torch.compile."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import rewrite
from codegen import cache
from rewrite import optimize, pass_infra
from rewrite.graph import op_name
from rewrite.kernel_listing import format_listings, kernel_listings
from rewrite.memory import record_saved
from rewrite.ops import use_triton_on_cpu
from rewrite.regions import grow_pointwise_region, is_pointwise

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)"
)

# The fused ops compute in float32 like the ops they replace: on the reference path they run
# the same ATen ops (1e-6 leaves room for autograd summing a broadcast gradient in another
# order); the emitted kernels reassociate and use the interpreter's transcendental functions.
REFERENCE_TOL = 1e-6
KERNEL_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _private_kernel_cache(tmp_path_factory):
    cache.set_cache_dir(tmp_path_factory.mktemp("kernels"))
    yield
    cache.set_cache_dir(None)


@pytest.fixture(scope="module")
def fuse_pointwise():
    """The example's FusePointwise pass, registered as "fuse_pointwise" for this module only."""
    saved = dict(pass_infra._registered)
    spec = importlib.util.spec_from_file_location("fuse_pointwise_example", ROOT / "examples" / "fuse_pointwise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "fuse_pointwise" in pass_infra.pass_names()
    yield module.FusePointwise
    pass_infra._registered.clear()
    pass_infra._registered.update(saved)


# ---- models ------------------------------------------------------------------------------------

DIM = 16


class ChainBlock(nn.Module):
    """linear -> bias add -> GELU -> scale -> residual add -> matmul: one region of four ops
    between two non-pointwise ops."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM, bias=False)
        self.bias = nn.Parameter(torch.randn(DIM))
        self.proj = nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5)

    def forward(self, x):
        y = F.gelu(self.fc(x) + self.bias) * 0.5 + x
        return y @ self.proj


class TwoRegions(nn.Module):
    """Two regions separated by a linear layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        y = self.fc2(F.silu(self.fc1(x)) * 2 + 1)
        return torch.tanh(y) - 0.25 * y


class SharedInput(nn.Module):
    """The region's input h is also read by a reduction outside it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, DIM)
        self.fc2 = nn.Linear(DIM, DIM)

    def forward(self, x):
        h = self.fc1(x)
        a = torch.sigmoid(h) * h + 1
        return self.fc2(a) + h.sum(-1, keepdim=True)


class ReenteringChain(nn.Module):
    """h = gelu(x + b) feeds a linear layer and, through h * 2, the sum with that layer's
    output: the sum cannot join h's region (h -> fc -> sum would leave and come back), so
    h * 2 + fc(h) is a second region reading the first one's output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.bias = nn.Parameter(torch.randn(DIM))

    def forward(self, x):
        h = F.gelu(x + self.bias)
        return self.fc(h) + h * 2


class Diamond(nn.Module):
    """a = x * 2 leaves through a reduction and comes back in c = a + b: a and c in one op
    would make the op its own input."""

    def forward(self, x):
        a = x * 2
        b = a.sum(-1, keepdim=True)
        c = a + b
        return c * 3


class ScaleResidual(nn.Module):
    """y = linear(x) * 0.5 + r: nothing in the region needs saving for the backward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x, r):
        return self.fc(x) * 0.5 + r


class GatedChain(nn.Module):
    """gelu(h + b) * sigmoid(h): unfused, autograd keeps the intermediates of every op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.bias = nn.Parameter(torch.randn(DIM))

    def forward(self, x):
        h = self.fc(x)
        return F.gelu(h + self.bias) * torch.sigmoid(h)


MODELS = {
    "chain_block": (ChainBlock, 1),
    "two_regions": (TwoRegions, 2),
    "shared_input": (SharedInput, 1),
    "reentering_chain": (ReenteringChain, 2),
}
EXAMPLE_BATCH, FRESH_BATCH = 4, 7  # fresh inputs of another batch size: the batch is dynamic


def example_input(batch=EXAMPLE_BATCH):
    return torch.randn(batch, DIM) * 1.5 + 0.25


@pytest.fixture(scope="module")
def built(fuse_pointwise):
    """name -> (model, rewritten with codegen); built once, shared by the tests."""
    torch.manual_seed(0)
    out = {}
    for name, (cls, _) in MODELS.items():
        model = cls()
        out[name] = (model, optimize(model, ["fuse_pointwise"], (example_input(),), codegen=True))
    return out


# ---- helpers -----------------------------------------------------------------------------------


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rewrite_ops(gm: fx.GraphModule) -> list[str]:
    return [op_name(n) for n in gm.graph.nodes if n.op == "call_function" and op_name(n).startswith("rewrite.")]


def outputs_and_grads(module, inputs: tuple, params: dict | None = None, seed: int = 1):
    """The output and the gradients of <output, g> (g fixed by ``seed``) for every parameter
    (``params``, default the module's) and every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    params = dict(module.named_parameters()) if params is None else params
    out = module(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, [*leaves, *params.values()], g)
    names = [f"input{k}" for k in range(len(leaves))] + list(params)
    return out.detach(), dict(zip(names, grads))


def assert_same_function(ours: nn.Module, original: nn.Module, inputs: tuple, tol: float) -> None:
    out, grads = outputs_and_grads(ours, inputs)
    ref_out, ref_grads = outputs_and_grads(original, inputs)
    assert torch.isfinite(out).all()
    assert out.shape == ref_out.shape
    assert rel_error(out, ref_out) <= tol, f"output: relative error {rel_error(out, ref_out):.3g}"
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        err = rel_error(grad, ref_grads[name])
        assert err <= tol, f"gradient of {name}: relative error {err:.3g}"


def pass_entry(m, name: str):
    entries = [p for p in m.report.passes if p.name == name]
    assert len(entries) == 1, [p.name for p in m.report.passes]
    return entries[0]


def reenters(region: list[fx.Node]) -> list[str]:
    """Region nodes reachable from a node outside the region that is itself reachable from
    the region (a path that leaves the region and comes back: one op would be its own input)."""
    inside = set(region)

    def reachable(starts):
        seen, frontier = set(), list(starts)
        while frontier:
            for user in frontier.pop().users:
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
        return seen

    outside = reachable(region) - inside
    return sorted(n.name for n in reachable(outside) & inside)


# ---- growing regions ---------------------------------------------------------------------------


def captured_graph(model: nn.Module, inputs: tuple | None = None) -> fx.GraphModule:
    return rewrite.capture(model, inputs or (example_input(),)).graph_module


def test_grow_from_any_node_of_the_chain_returns_the_chain_and_stops_at_linear_and_matmul():
    gm = captured_graph(ChainBlock())
    chain_targets = [aten.add.Tensor, aten.gelu.default, aten.mul.Tensor, aten.add.Tensor]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    chain = [n for n in calls if n.target in chain_targets]
    assert [n.target for n in chain] == chain_targets
    for seed in chain:
        assert is_pointwise(seed)
        assert grow_pointwise_region(seed) == chain, seed.name
    for seed in calls:
        if seed.target in (aten.linear.default, aten.matmul.default):
            assert not is_pointwise(seed)
            assert grow_pointwise_region(seed) == []


def test_grow_never_puts_both_ends_of_a_detour_through_a_reduction_in_one_region():
    gm = captured_graph(Diamond())
    nodes = {n.name: n for n in gm.graph.nodes}
    a, c = nodes["mul"], nodes["add"]
    assert nodes["sum_1"].args[0] is a and c.args == (a, nodes["sum_1"])
    for seed in [n for n in gm.graph.nodes if is_pointwise(n)]:
        region = grow_pointwise_region(seed)
        assert seed in region, f"seed {seed.name}: region {[n.name for n in region]}"
        assert not (a in region and c in region), f"seed {seed.name}: region {[n.name for n in region]} is a cycle"
        assert reenters(region) == [], f"seed {seed.name}: region {[n.name for n in region]}"


@pytest.mark.parametrize(
    "cls", [ChainBlock, TwoRegions, SharedInput, ReenteringChain, Diamond, GatedChain, ScaleResidual],
    ids=lambda c: c.__name__,
)
def test_grown_regions_contain_their_seed_and_never_leave_and_reenter(cls):
    inputs = (example_input(), example_input()) if cls is ScaleResidual else None
    gm = captured_graph(cls(), inputs)
    for seed in [n for n in gm.graph.nodes if is_pointwise(n)]:
        region = grow_pointwise_region(seed)
        names = [n.name for n in region]
        assert seed in region, f"seed {seed.name}: {names}"
        assert all(is_pointwise(n) for n in region), names
        assert region == [n for n in gm.graph.nodes if n in set(region)], f"not in graph order: {names}"
        assert reenters(region) == [], f"seed {seed.name}: {names} leaves and comes back"


# ---- optimize(..., codegen=True) ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_codegen_replaces_each_marked_region_by_a_pointwise_op(built, name):
    _, m = built[name]
    expected_regions = MODELS[name][1]
    targets = [n.target for n in m.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rewrite.pointwise.default) == expected_regions
    entry = pass_entry(m, "codegen")
    assert len(entry.changes) == expected_regions
    assert all(c.after == "rewrite.pointwise" for c in entry.changes)
    m.graph.lint()


@pytest.mark.parametrize("codegen", [False, None])
def test_without_codegen_no_pointwise_op_appears(fuse_pointwise, codegen):
    if codegen is None and torch.cuda.is_available():
        pytest.skip("codegen=None means on where CUDA is available")
    model = ChainBlock()
    m = optimize(model, ["fuse_pointwise"], (example_input(),), codegen=codegen)
    assert "rewrite.pointwise" not in rewrite_ops(m)
    assert [p.name for p in m.report.passes] == ["fuse_pointwise"]
    assert len(pass_entry(m, "fuse_pointwise").changes) == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_path_computes_the_original_model(built, name):
    model, m = built[name]
    assert_same_function(m, model, (example_input(FRESH_BATCH),), REFERENCE_TOL)


@interpreted
@pytest.mark.parametrize("name", list(MODELS))
def test_emitted_kernels_compute_the_original_model(built, name, monkeypatch):
    model, m = built[name]
    launched = []
    emitter = importlib.import_module("codegen.pointwise")  # the package's `pointwise` is a function
    for fn in ("launch_forward", "launch_backward"):
        original = getattr(emitter, fn)
        monkeypatch.setattr(emitter, fn, lambda *a, _f=original, _n=fn, **k: launched.append(_n) or _f(*a, **k))
    with use_triton_on_cpu():
        assert_same_function(m, model, (example_input(FRESH_BATCH),), KERNEL_TOL)
    regions = MODELS[name][1]
    assert launched.count("launch_forward") == regions and launched.count("launch_backward") == regions


def test_diamond_through_a_reduction_still_optimizes_to_an_acyclic_equal_graph(fuse_pointwise):
    model = Diamond()
    m = optimize(model, ["fuse_pointwise"], (example_input(),), codegen=True)
    m.graph.lint()
    for node in m.graph.nodes:
        if node.target is torch.ops.rewrite.pointwise.default:
            steps = json.loads(node.args[1])["steps"]
            assert not {"mul", "add"} <= {s["name"] for s in steps}, "a and c fused around the reduction"
    assert_same_function(m, model, (example_input(FRESH_BATCH),), REFERENCE_TOL)


# ---- chaining with approx_bp -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chained(fuse_pointwise):
    torch.manual_seed(0)
    model = ChainBlock()
    x = example_input()
    both = optimize(model, ["fuse_pointwise", "approx_bp"], (x,), codegen=True)
    approx_only = optimize(model, ["approx_bp"], (x,))
    return model, both, approx_only


def test_approx_bp_after_marking_splits_the_region_and_codegen_reports_it(chained):
    _, m, _ = chained
    ops = rewrite_ops(m)
    assert "rewrite.regelu2" in ops and "rewrite.pointwise" in ops
    entry = pass_entry(m, "codegen")
    # the GELU became regelu2: the bias add before it is left alone (one op), the scale and
    # residual add after it are fused
    assert len(entry.changes) == 1 and entry.changes[0].after == "rewrite.pointwise"
    assert len(entry.skipped) == 1 and "aten.add" in entry.skipped[0].op
    m.graph.lint()


def test_approx_bp_with_codegen_trains_like_approx_bp_alone(chained):
    model, m, approx_only = chained
    x = example_input(FRESH_BATCH)
    m.zero_grad(set_to_none=True)
    m(x).pow(2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    m.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    # codegen is exact: the gradients are approx_bp's, whatever fuses them
    assert_same_function(m, approx_only, (x,), REFERENCE_TOL)


@interpreted
def test_approx_bp_with_codegen_on_the_kernel_path(chained):
    _, m, approx_only = chained
    with use_triton_on_cpu():
        assert_same_function(m, approx_only, (example_input(FRESH_BATCH),), KERNEL_TOL)


# ---- what the backward keeps ---------------------------------------------------------------------


def saved_bytes(module: nn.Module, inputs: tuple, path: str) -> int:
    """Bytes autograd keeps for the backward of one call, on the kernel or reference path."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with use_triton_on_cpu() if path == "kernel" else contextlib.nullcontext():
        with record_saved(module) as saved:
            module(*leaves)
    return saved.total_bytes


PATHS = [pytest.param("kernel", marks=interpreted), "reference"]


@pytest.mark.parametrize("path", PATHS)
def test_fused_scale_and_residual_saves_no_more_than_the_unfused_graph(fuse_pointwise, path):
    model = ScaleResidual()
    inputs = (example_input(), example_input())
    fused = optimize(model, ["fuse_pointwise"], inputs, codegen=True)
    unfused = optimize(model, ["fuse_pointwise"], inputs, codegen=False)
    assert "rewrite.pointwise" in rewrite_ops(fused)
    fresh = (example_input(FRESH_BATCH), example_input(FRESH_BATCH))
    # a scalar multiply and an add need nothing from the forward for their backward: both
    # graphs keep only the linear layer's input
    fused_bytes, unfused_bytes = saved_bytes(fused, fresh, path), saved_bytes(unfused, fresh, path)
    assert fused_bytes <= unfused_bytes, f"fused keeps {fused_bytes} B for the backward, unfused {unfused_bytes} B"
    if path == "reference":  # what the report measured, on the example inputs
        before, after = pass_entry(fused, "codegen").activation_bytes
        assert after <= before, f"the report says {before} B -> {after} B"


@pytest.mark.parametrize("path", PATHS)
def test_fused_region_with_intermediates_saves_less_than_the_unfused_graph(fuse_pointwise, path):
    model = GatedChain()
    x = example_input()
    fused = optimize(model, ["fuse_pointwise"], (x,), codegen=True)
    unfused = optimize(model, ["fuse_pointwise"], (x,), codegen=False)
    fresh = (example_input(FRESH_BATCH),)
    # unfused: gelu's input h + b, and gelu's and sigmoid's outputs (the product's operands);
    # fused: h alone (the bias is a parameter); both: the linear layer's input x
    row = FRESH_BATCH * DIM * 4
    fused_bytes, unfused_bytes = saved_bytes(fused, fresh, path), saved_bytes(unfused, fresh, path)
    assert unfused_bytes >= fused_bytes + 2 * row, f"fused keeps {fused_bytes} B, unfused {unfused_bytes} B"
    if path == "reference":
        before, after = pass_entry(fused, "codegen").activation_bytes
        assert after < before, f"the report says {before} B -> {after} B"


# ---- save / load -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_saved_model_with_a_pointwise_op_loads_in_a_fresh_interpreter(built, tmp_path):
    _, m = built["chain_block"]
    path = rewrite.save(m, tmp_path / "chain.pt2")
    x = example_input(FRESH_BATCH).requires_grad_(True)
    y = m(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.save({"x": x.detach(), "y": y.detach(), "gx": gx}, tmp_path / "io.pt")
    code = f"""
        import json
        import torch
        import rewrite
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        module = rewrite.load({str(path)!r})
        ops = sorted({{str(n.target) for n in module.graph.nodes if n.op == "call_function"}})
        x = io["x"].clone().requires_grad_(True)
        y = module(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
        print(json.dumps({{"ops": ops, "equal": torch.equal(y, io["y"]), "grad_equal": torch.equal(gx, io["gx"])}}))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "rewrite.pointwise.default" in result["ops"]
    assert result["equal"] and result["grad_equal"]


# ---- kernel listings ---------------------------------------------------------------------------------


def assert_listings_cover_the_graph(m) -> None:
    listings = m.kernels()
    op_nodes = [n for n in m.graph.nodes if n.op == "call_function" and op_name(n).startswith("rewrite.")]
    assert [(k.node, k.op) for k in listings] == [(n.name, op_name(n)) for n in op_nodes]
    text = format_listings(listings)
    for listing in listings:
        assert "forward" in listing.sources
        float_outputs = listing.op != "rewrite.pointwise" or any(
            t.is_floating_point() for t in next(n for n in op_nodes if n.name == listing.node).meta["val"]
        )
        assert ("backward" in listing.sources) == float_outputs, listing.node
        for kind, source in listing.sources.items():
            assert "@triton.jit" in source, (listing.node, kind)
            compile(source, f"{listing.node}_{kind}", "exec")
            assert source in text
        for line in listing.region.splitlines():
            assert f"# {line}" in text, line


@pytest.mark.parametrize("name", list(MODELS))
def test_kernels_lists_each_pointwise_op_with_valid_sources(built, name):
    _, m = built[name]
    assert len(m.kernels()) == MODELS[name][1]
    assert_listings_cover_the_graph(m)


def test_kernels_of_the_approx_bp_chain_list_regelu2_and_pointwise(chained):
    _, m, _ = chained
    assert {k.op for k in m.kernels()} == {"rewrite.regelu2", "rewrite.pointwise"}
    assert_listings_cover_the_graph(m)
    assert kernel_listings(m, only={"regelu2"})[0].op == "rewrite.regelu2"


# ---- torch.compile -----------------------------------------------------------------------------------


def test_torch_compile_of_a_model_with_a_pointwise_op_equals_eager(built):
    import torch._dynamo

    _, m = built["chain_block"]
    x = example_input(FRESH_BATCH)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m)
        out, grads = outputs_and_grads(compiled, (x,), params=dict(m.named_parameters()))
    finally:
        torch._dynamo.reset()
    eager_out, eager_grads = outputs_and_grads(m, (x,))
    # Inductor generates its own C++ for the reference ops: equal up to float32 rounding
    assert rel_error(out, eager_out) <= REFERENCE_TOL
    for name, grad in grads.items():
        assert rel_error(grad, eager_grads[name]) <= REFERENCE_TOL, name
