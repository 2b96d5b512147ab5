"""The Triton source behind each ``torch.ops.rewrite`` op of a graph, next to what it computes.

Used by ``RewrittenModule.kernels()``, ``rewrite inspect --kernels`` and the HTML report.
Sources are emitted for the dtypes and layouts in the graph's metadata (sizes that are
symbolic take their example value), the way the op would emit them on the machine at hand:
autotuned on a GPU, fixed block sizes under the CPU interpreter. Emitting source needs sympy
only; running it needs Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.graph import concrete, describe_value, op_name


@dataclass
class KernelListing:
    node: str  # the graph node calling the op
    op: str  # e.g. "rewrite.pointwise"
    region: str  # what the kernels compute, as text
    sources: dict[str, str] = field(default_factory=dict)  # "forward" / "backward" -> Triton source


def example_tensor(val: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``val``'s dtype, sizes and strides, symbolic sizes at their example value."""
    def size(d):
        try:
            return int(concrete(d))
        except (ValueError, TypeError):
            return 2  # no example value: any size above 1 gives the same kernel
    return torch.empty_strided([size(d) for d in val.shape], [size(s) for s in val.stride()], dtype=val.dtype,
                               device="meta")  # fmt: skip


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _pointwise(node: fx.Node) -> KernelListing:
    from codegen.pointwise import PointwiseKernel
    from codegen.region import Region

    inputs, spec = node.args[0], node.args[1]
    region = Region.from_spec(spec)
    examples = [example_tensor(_val(i)) for i in inputs]
    kernel = PointwiseKernel(region, examples, _val(inputs[0]).device)
    sources = {"forward": kernel.source}
    if any(dt.is_floating_point for dt in region.output_dtypes()):
        sources["backward"] = kernel.backward_source
    return KernelListing(node.name, op_name(node), region.describe(), sources)


def _step_activation(node: fx.Node) -> KernelListing:
    from codegen.templates import packed2_backward_source, packed2_forward_source
    from rewrite.ops.step_activation import REGELU2, RESILU2, template_expressions, template_gradient

    name = op_name(node).split(".")[1]
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    x = _val(node.args[0])
    approx = REGELU2 if name == "regelu2" else RESILU2
    value, code = template_expressions(name, approximate)
    text = (
        f"y, codes = {op_name(node)}(x: {describe_value(x)})\n"
        f"y = {value}\ncode = {code}  (2 bits, 4 per byte)\ngrad_x = grad_y * slope[code], slopes {approx.slopes}"
    )
    return KernelListing(
        node.name,
        op_name(node),
        text,
        {
            "forward": packed2_forward_source(value, code, x.dtype),
            "backward": packed2_backward_source(template_gradient(tuple(approx.slopes)), x.dtype),
        },
    )


def _norm(node: fx.Node) -> KernelListing:
    from rewrite.ops.ms_norm import _row_kernels

    rms = op_name(node) == "rewrite.ms_rms_norm"
    x = _val(node.args[0])
    y = _val(node)[0]
    forward, backward = _row_kernels(rms)
    text = (
        f"y, rstd = {op_name(node)}(x: {describe_value(x)}, normalized_shape={node.args[1]})\n"
        "one program per row; backward from y and rstd only"
    )
    return KernelListing(
        node.name,
        op_name(node),
        text,
        {
            "forward": forward.source((x.dtype,), y.dtype),
            "backward": backward.source((y.dtype, y.dtype, torch.float32), x.dtype),
        },
    )


def _row_polynomial(node: fx.Node) -> KernelListing:
    from codegen.templates import row_polynomial_kernels

    x, coeffs = _val(node.args[0]), _val(node.args[1])
    degree = int(concrete(coeffs.shape[1])) - 1
    forward, backward = row_polynomial_kernels(degree)
    dtypes = (x.dtype,) + (coeffs.dtype,) * (degree + 1)
    return KernelListing(
        node.name,
        op_name(node),
        f"y = sum_k coeffs[c, k] * x^k, degree {degree}, x: {describe_value(x)}",
        {
            "forward": forward.source(dtypes, x.dtype),
            "backward": backward.source((x.dtype, x.dtype) + dtypes[1:], x.dtype),
        },
    )


def _masked_matmul(node: fx.Node) -> KernelListing:
    from codegen.templates import masked_matmul_source

    a, mask = _val(node.args[0]), _val(node.args[2])
    mask_dtype = torch.uint8 if mask.dtype == torch.bool else mask.dtype
    return KernelListing(
        node.name, op_name(node), "out = (a @ b) * mask", {"forward": masked_matmul_source(a.dtype, mask_dtype)}
    )


_LISTERS = {
    "rewrite.pointwise": _pointwise,
    "rewrite.regelu2": _step_activation,
    "rewrite.resilu2": _step_activation,
    "rewrite.ms_layer_norm": _norm,
    "rewrite.ms_rms_norm": _norm,
    "rewrite.row_polynomial": _row_polynomial,
    "rewrite.masked_matmul": _masked_matmul,
}


def kernel_listings(graph: fx.Graph | fx.GraphModule, only: set[str] | None = None) -> list[KernelListing]:
    """One listing per rewrite op in ``graph`` (restricted to the node names in ``only``)."""
    graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
    listings = []
    for node in graph.nodes:
        if node.op != "call_function" or (only is not None and node.name not in only):
            continue
        lister = _LISTERS.get(op_name(node))
        if lister is not None:
            listings.append(lister(node))
    return listings


def format_listings(listings: list[KernelListing]) -> str:
    """Plain text: each op's region, then its kernels' source."""
    if not listings:
        return "no rewrite ops with emitted kernels in this graph\n"
    parts = []
    for listing in listings:
        rule = "=" * 100
        region = "\n".join("# " + line for line in listing.region.splitlines())
        parts.append(f"{rule}\n# {listing.op} at node {listing.node}\n{region}\n{rule}")
        for name, source in listing.sources.items():
            parts.append(f"# ---- {name} kernel ----\n{source}")
    return "\n".join(parts)
