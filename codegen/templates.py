"""Parameterised Triton templates for regions that are not purely pointwise.

Each template is a fixed loop structure with slots filled by sympy expressions, printed by the
same ``TritonPrinter`` and loaded through the same cache as the pointwise kernels, so there is
one way kernels are made:

- ``packed2``: an elementwise map whose output includes a 2-bit code per element, packed four
  to a byte (element k of a group of four in bits 2k..2k+1), and the map that reads such codes
  back (``packed2_forward_source`` / ``packed2_backward_source``). approx_bp's ReGELU2 /
  ReSiLU2 are instances.
- ``row``: one program per row of a [R, N] tensor; a sequence of row statistics (sums over
  the row of an expression, or expressions of earlier statistics), then per-row and
  per-element outputs (``RowKernel``). The memory-sharing norms' forward and backward and the
  row-wise polynomial are instances.
- ``masked_matmul``: ``(A @ B) * mask`` computed tile by tile with ``tl.dot``, tiles whose
  mask is all zero skipped (``masked_matmul_source``): the sampled dense-dense product that
  sparse backward passes need.

Block sizes come from a heuristic; on a GPU the elementwise templates are autotuned like the
pointwise kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy
import torch

from codegen import cache
from codegen.launch import ELEMENTWISE_BLOCK, interpreted, on_device
from codegen.pointwise import GPU_CONFIGS, _autotune, _quiet_interpreter, is_constant, print_expressions
from codegen.printer import TL_DTYPES, TritonPrinter, helper_source

HEADER = "# Emitted by rewrite.codegen from the {template} template: {what}.\nimport triton\nimport triton.language as tl\n"


def _gpu_tuned() -> bool:
    return torch.cuda.is_available() and _autotune(torch.device("cuda"))


def _autotune_decorator(key: str, block: str = "BLOCK") -> str:
    if not _gpu_tuned():
        return "@triton.jit\n"
    configs = ", ".join(f'triton.Config({{"{block}": {b}}}, num_warps={w})' for b, w in GPU_CONFIGS)
    return f'@triton.autotune(configs=[{configs}], key=["{key}"])\n@triton.jit\n'


def _indent(lines) -> str:
    return "\n".join("    " + line for line in lines)


def _launch(source: str, name: str, specialisation: str, grid, args, device_tensor, **meta):
    from torch.library import wrap_triton

    module = cache.load(source, specialisation)
    kernel = wrap_triton(getattr(module, name))
    with on_device(device_tensor), _quiet_interpreter():
        kernel[grid](*args, **meta)


# ---- packed 2-bit codes ---------------------------------------------------------------------

X = sympy.Symbol("a0", real=True)  # the element of the forward's input
GRAD = sympy.Symbol("a0", real=True)  # the element of the backward's incoming gradient
CODE = sympy.Symbol("c0", integer=True, nonnegative=True)  # the element's 2-bit code

_GROUPS_PRELUDE = [
    "GROUPS: tl.constexpr = BLOCK // 4",
    "group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)",
    "lane = tl.arange(0, 4)",
    "offs = group[:, None] * 4 + lane[None, :]",
    "mask = offs < n",
    "group_mask = group < (n + 3) // 4",
]


@functools.lru_cache(maxsize=64)
def packed2_forward_source(value: sympy.Expr, code: sympy.Expr, dtype: torch.dtype) -> str:
    """y = value(x) and the packed codes code(x) in {0..3}, one pass over x."""
    printer = TritonPrinter(torch.float32)
    body, (y, c), _, _ = print_expressions(printer, [value, code])
    lines = [
        *_GROUPS_PRELUDE,
        "a0 = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)",
        *body,
        f"tl.store(y_ptr + offs, ({y}).to({TL_DTYPES[dtype]}), mask=mask)",
        f"code = tl.where(mask, ({c}).to(tl.int32), 0)",
        "packed = tl.sum(code << (lane[None, :] * 2), axis=1)",
        "tl.store(codes_ptr + group, packed.to(tl.uint8), mask=group_mask)",
    ]
    return _packed2_kernel("packed2_forward(x_ptr, y_ptr, codes_ptr, n", lines, printer, f"y = {value}; code = {code}")


@functools.lru_cache(maxsize=64)
def packed2_backward_source(grad_in: sympy.Expr, dtype: torch.dtype) -> str:
    """grad_in(grad, code) with the codes unpacked on the fly."""
    printer = TritonPrinter(torch.float32)
    body, (g,), _, _ = print_expressions(printer, [grad_in])
    lines = [
        *_GROUPS_PRELUDE,
        "packed = tl.load(codes_ptr + group, mask=group_mask, other=0).to(tl.int32)",
        "c0 = (packed[:, None] >> (lane[None, :] * 2)) & 3",
        "a0 = tl.load(grad_ptr + offs, mask=mask, other=0).to(tl.float32)",
        *body,
        f"tl.store(out_ptr + offs, ({g}).to({TL_DTYPES[dtype]}), mask=mask)",
    ]
    return _packed2_kernel("packed2_backward(grad_ptr, codes_ptr, out_ptr, n", lines, printer, f"grad_in = {grad_in}")


def _packed2_kernel(signature: str, lines: list[str], printer: TritonPrinter, what: str) -> str:
    return (
        HEADER.format(template="packed2", what=what)
        + helper_source(printer.helpers)
        + "\n\n"
        + _autotune_decorator("n")
        + f"def {signature}, BLOCK: tl.constexpr):\n{_indent(lines)}\n"
    )


def _elementwise_launch(n: int):
    if not _gpu_tuned():
        return (-(-n // ELEMENTWISE_BLOCK),), {"BLOCK": ELEMENTWISE_BLOCK}
    return (lambda meta: (-(-n // meta["BLOCK"]),)), {}


def packed2_forward(x: torch.Tensor, value: sympy.Expr, code: sympy.Expr) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    n = x.numel()
    y = torch.empty_like(x)
    codes = torch.empty(((n + 3) // 4,), dtype=torch.uint8, device=x.device)
    if n:
        source = packed2_forward_source(value, code, x.dtype)
        grid, meta = _elementwise_launch(n)
        _launch(source, "packed2_forward", str(x.dtype), grid, (x, y, codes, n), x, **meta)
    return y, codes


def packed2_backward(grad: torch.Tensor, codes: torch.Tensor, grad_in: sympy.Expr) -> torch.Tensor:
    grad = grad.contiguous()
    n = grad.numel()
    out = torch.empty_like(grad)
    if n:
        source = packed2_backward_source(grad_in, grad.dtype)
        grid, meta = _elementwise_launch(n)
        _launch(source, "packed2_backward", str(grad.dtype), grid, (grad, codes, out, n), grad, **meta)
    return out


# ---- row kernels ------------------------------------------------------------------------------

N = sympy.Symbol("N", integer=True, positive=True)  # the row length


@dataclass(frozen=True)
class RowStat:
    """``name = sum over the row of expr`` (``is_sum``) or ``name = expr`` of earlier stats."""

    name: str
    expr: sympy.Expr
    is_sum: bool = True


@dataclass(frozen=True)
class RowKernel:
    """One program per row of [R, N] contiguous tensors.

    ``element_inputs``: names of the [R, N] inputs; ``row_inputs``: names of [R] inputs;
    ``scalars``: names of float arguments (eps, ...); ``stats`` in order; ``row_outputs``:
    stats stored per row (float32); ``element_outputs``: expressions stored per element.
    Expressions use the input names as real symbols, ``N`` for the row length, and the
    names of earlier stats.
    """

    name: str
    element_inputs: tuple[str, ...]
    row_inputs: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    stats: tuple[RowStat, ...] = ()
    row_outputs: tuple[str, ...] = ()
    element_outputs: tuple[sympy.Expr, ...] = ()

    @functools.lru_cache(maxsize=64)  # noqa: B019 - instances are frozen and few
    def source(self, input_dtypes: tuple[torch.dtype, ...], output_dtype: torch.dtype) -> str:
        printer = TritonPrinter(torch.float32)
        params = [f"{n}_ptr" for n in self.element_inputs + self.row_inputs]
        params += list(self.scalars)
        params += [f"out{k}_ptr" for k in range(len(self.element_outputs))]
        params += [f"{n}_out_ptr" for n in self.row_outputs]
        lines = ["row = tl.program_id(0).to(tl.int64)", "base = row * N"]
        for name in self.row_inputs:
            lines.append(f"{name} = tl.load({name}_ptr + row).to(tl.float32)")
        for k, group in enumerate(self._stat_groups()):
            if not group[0].is_sum:
                body, (text,), _, _ = print_expressions(printer, [group[0].expr], prefix=f"s{k}_")
                lines += body + [f"{group[0].name} = {text}"]
                continue
            # Sums that do not read each other share one pass over the row.
            body, texts, _, _ = print_expressions(printer, [stat.expr for stat in group], prefix=f"s{k}_")
            lines += [f"acc_{stat.name} = tl.zeros([BLOCK_N], tl.float32)" for stat in group]
            lines.append("for start in range(0, N, BLOCK_N):")
            free = set().union(*(stat.expr.free_symbols for stat in group))
            inner = self._column_loads(free, input_dtypes) + body
            inner += [f"acc_{stat.name} += tl.where(cmask, {text}, 0.0)" for stat, text in zip(group, texts)]
            lines += ["    " + line for line in inner]
            lines += [f"{stat.name} = tl.sum(acc_{stat.name}, axis=0)" for stat in group]
        if self.element_outputs:
            body, texts, _, reduced = print_expressions(printer, list(self.element_outputs), prefix="e")
            free = set().union(*(e.free_symbols for e in self.element_outputs))
            inner = self._column_loads(free, input_dtypes) + body
            for k, (expr, text) in enumerate(zip(reduced, texts)):
                value = f"tl.full([BLOCK_N], {text}, tl.float32)" if is_constant(expr) else text
                inner.append(f"tl.store(out{k}_ptr + base + cols, ({value}).to({TL_DTYPES[output_dtype]}), mask=cmask)")
            lines += ["for start in range(0, N, BLOCK_N):"] + ["    " + line for line in inner]
        for name in self.row_outputs:
            lines.append(f"tl.store({name}_out_ptr + row, {name})")
        what = "; ".join(f"{s.name} = {'sum ' if s.is_sum else ''}{s.expr}" for s in self.stats)
        return (
            HEADER.format(template="row", what=f"{self.name}: {what}")
            + helper_source(printer.helpers)
            + "\n\n@triton.jit\n"
            + f"def {self.name}({', '.join(params)}, N, BLOCK_N: tl.constexpr):\n{_indent(lines)}\n"
        )

    def _stat_groups(self) -> list[list[RowStat]]:
        groups: list[list[RowStat]] = []
        for stat in self.stats:
            last = groups[-1] if groups else None
            reads = {s.name for s in stat.expr.free_symbols}
            if stat.is_sum and last and last[0].is_sum and not reads & {s.name for s in last}:
                last.append(stat)
            else:
                groups.append([stat])
        return groups

    def _column_loads(self, symbols, input_dtypes) -> list[str]:
        lines = ["cols = start + tl.arange(0, BLOCK_N)", "cmask = cols < N"]
        names = {s.name for s in symbols}
        for name, _ in zip(self.element_inputs, input_dtypes):
            if name in names:
                lines.append(f"{name} = tl.load({name}_ptr + base + cols, mask=cmask, other=0).to(tl.float32)")
        return lines

    def __call__(self, element_inputs, row_inputs=(), scalars=(), output_dtype=None):
        """Run on [R, N] contiguous tensors; returns (element outputs, row outputs)."""
        x0 = element_inputs[0]
        rows, n = x0.shape
        output_dtype = output_dtype or x0.dtype
        element_inputs = [t.contiguous() for t in element_inputs]
        row_inputs = [t.contiguous() for t in row_inputs]
        outs = [torch.empty((rows, n), dtype=output_dtype, device=x0.device) for _ in self.element_outputs]
        row_outs = [torch.empty((rows,), dtype=torch.float32, device=x0.device) for _ in self.row_outputs]
        if rows and n:
            dtypes = tuple(t.dtype for t in element_inputs + row_inputs)
            source = self.source(dtypes, output_dtype)
            block = min(max(16, 1 << (n - 1).bit_length()), 4096 if interpreted() else 2048)
            args = (*element_inputs, *row_inputs, *(float(s) for s in scalars), *outs, *row_outs, n)
            _launch(source, self.name, str(dtypes), (rows,), args, x0, BLOCK_N=block)
        return outs, row_outs


def _symbols(*names):
    return [sympy.Symbol(n, real=True) for n in names]


def layer_norm_kernels() -> tuple[RowKernel, RowKernel]:
    """Memory-sharing LayerNorm: forward (y, rstd) and backward dx from (g, y, rstd)."""
    x, g, y, mean, rstd, eps, mgy, mg = _symbols("x", "g", "y", "mean", "rstd", "eps", "mgy", "mg")
    sx, sxx, sg, sgy = _symbols("sx", "sxx", "sg", "sgy")
    forward = RowKernel(
        "ms_layer_norm_forward",
        element_inputs=("x",),
        scalars=("eps",),
        stats=(
            RowStat("sx", x),
            RowStat("mean", sx / N, is_sum=False),
            RowStat("sxx", (x - mean) ** 2),  # two passes: no cancellation in the variance
            RowStat("rstd", 1 / sympy.sqrt(sxx / N + eps), is_sum=False),
        ),
        row_outputs=("rstd",),
        element_outputs=((x - mean) * rstd,),
    )
    backward = RowKernel(
        "ms_layer_norm_backward",
        element_inputs=("g", "y"),
        row_inputs=("rstd",),
        stats=(RowStat("sg", g), RowStat("sgy", g * y), RowStat("mg", sg / N, False), RowStat("mgy", sgy / N, False)),
        element_outputs=(rstd * (g - mg - y * mgy),),
    )
    return forward, backward


def rms_norm_kernels() -> tuple[RowKernel, RowKernel]:
    """Memory-sharing RMSNorm: forward (y, rstd) and backward dx from (g, y, rstd)."""
    x, g, y, rstd, eps, sxx, sgy = _symbols("x", "g", "y", "rstd", "eps", "sxx", "sgy")
    forward = RowKernel(
        "ms_rms_norm_forward",
        element_inputs=("x",),
        scalars=("eps",),
        stats=(RowStat("sxx", x * x), RowStat("rstd", 1 / sympy.sqrt(sxx / N + eps), is_sum=False)),
        row_outputs=("rstd",),
        element_outputs=(x * rstd,),
    )
    backward = RowKernel(
        "ms_rms_norm_backward",
        element_inputs=("g", "y"),
        row_inputs=("rstd",),
        stats=(RowStat("sgy", g * y),),
        element_outputs=(rstd * (g - y * sgy / N),),
    )
    return forward, backward


@functools.cache
def row_polynomial_kernels(degree: int) -> tuple[RowKernel, RowKernel]:
    """y = sum_k c_k x^k with coefficients per row (forward), and the backward: dx per element
    and d c_k = sum over the row of g x^k per row."""
    x, g = _symbols("x", "g")
    coeffs = _symbols(*(f"c{k}" for k in range(degree + 1)))
    names = tuple(c.name for c in coeffs)
    horner = coeffs[degree]
    for k in range(degree - 1, -1, -1):
        horner = horner * x + coeffs[k]
    forward = RowKernel(
        f"row_polynomial{degree}_forward", element_inputs=("x",), row_inputs=names, element_outputs=(horner,)
    )
    backward = RowKernel(
        f"row_polynomial{degree}_backward",
        element_inputs=("x", "g"),
        row_inputs=names,
        stats=tuple(RowStat(f"d{k}", g * x**k) for k in range(degree + 1)),
        row_outputs=tuple(f"d{k}" for k in range(degree + 1)),
        element_outputs=(g * sympy.diff(horner, x),),
    )
    return forward, backward


# ---- masked sampled matmul ----------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def masked_matmul_source(dtype: torch.dtype, mask_dtype: torch.dtype) -> str:
    """C = (A @ B) * mask, tiles of C whose mask is all zero skipped (written as zeros)."""
    out = TL_DTYPES[dtype]
    body = f"""
@triton.jit
def masked_matmul(a_ptr, b_ptr, mask_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_mm, stride_mn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_mask = (rows[:, None] < M) & (cols[None, :] < N)
    keep = tl.load(mask_ptr + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn,
                   mask=tile_mask, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if tl.max(tl.max(tl.abs(keep), axis=1), axis=0) > 0:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0)
            b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn,
                        mask=(ks[:, None] < K) & (cols[None, :] < N), other=0)
            acc += tl.dot(a, b, input_precision="ieee")
    c = acc * keep
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], c.to({out}), mask=tile_mask)
"""
    return HEADER.format(template="masked_matmul", what=f"(A @ B) * mask, {dtype}") + body


def masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m and n:
        block_m, block_n = (32, 32) if interpreted() else (64, 64)
        block_k = min(32, max(16, 1 << (max(k, 1) - 1).bit_length()))
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        source = masked_matmul_source(a.dtype, mask.dtype)
        grid = (math.ceil(m / block_m), math.ceil(n / block_n))
        args = (a, b, mask, out, m, n, k, *a.stride(), *b.stride(), *mask.stride())
        _launch(source, "masked_matmul", str((a.dtype, mask.dtype)), grid, args, a,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip
    return out
