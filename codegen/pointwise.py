"""Emit, cache and launch Triton kernels for pointwise regions.

``pointwise(fn, *example_tensors)`` captures ``fn`` with ``make_fx``, turns it into a
``Region`` and returns a ``PointwiseKernel``: callable like ``fn`` (through the
``torch.ops.rewrite.pointwise`` op, so it is differentiable, exportable and compilable),
with ``.source`` and ``.backward_source`` holding the Triton text emitted for the examples.

How a kernel is made:

1. The region becomes assignments, one sympy expression per op over the operands and earlier
   ops (``Region.program``); the backward accumulates ``d_v = sum_u d_u * du/dv`` over the
   same assignments in reverse, each partial derivative from sympy's ``diff``.
2. The iteration space is the broadcast shape of the operands, with adjacent dimensions
   merged wherever every operand allows it. Each operand is *linear* (same shape,
   contiguous: offset = index), *scalar* (one element) or *strided* (offset from the index's
   coordinates and the operand's strides; broadcast dimensions have no term).
3. ``sympy.cse`` shares common subexpressions within each op's expression, ``TritonPrinter``
   prints them, and the source goes through the kernel cache (``codegen.cache``) to a module.

Block sizes: on a GPU the kernel is autotuned over a few block sizes and warp counts keyed on
the element count; under the CPU interpreter (which runs one program at a time, vectorised
with numpy) one block covers up to 4096 elements.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import sympy
import torch

from codegen import cache
from codegen.launch import interpreted, on_device
from codegen.printer import TL_DTYPES, TritonPrinter, helper_source
from codegen.region import Program, Region, UnsupportedRegion
from codegen.sym import Kind, SymValue

INTERPRETER_MAX_BLOCK = 4096
GPU_CONFIGS = ((1024, 4), (2048, 8), (4096, 8))  # (BLOCK, num_warps) tried by autotune


@dataclass(frozen=True)
class Layout:
    kind: str  # "linear" | "scalar" | "strided"
    dims: tuple[int, ...] = ()  # strided: the iteration dims with a non-zero stride

    def describe(self) -> str:
        return self.kind if self.kind != "strided" else f"strided{list(self.dims)}"


@dataclass(frozen=True)
class Signature:
    """What a kernel's source is specialised for, besides the region's dtypes."""

    rank: int
    layouts: tuple[Layout, ...]
    index64: bool
    autotune: bool

    def describe(self, dtypes) -> str:
        operands = ", ".join(f"{str(d).removeprefix('torch.')}:{lay.describe()}" for d, lay in zip(dtypes, self.layouts))
        return f"rank {self.rank}; operands {operands}; {'int64' if self.index64 else 'int32'} index"


# ---- iteration space ----------------------------------------------------------------------------


def collapse(shape: tuple[int, ...], strides: list[tuple[int, ...]]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Merge adjacent dims that every operand walks as one (stride[d] == stride[d+1] * size[d+1]);
    drop size-1 dims."""
    dims = [(size, [s[d] for s in strides]) for d, size in enumerate(shape) if size != 1]
    if not dims:
        return (), [() for _ in strides]
    merged = [dims[0]]
    for size, st in dims[1:]:
        prev_size, prev_st = merged[-1]
        if all(p == s * size for p, s in zip(prev_st, st)):
            merged[-1] = (prev_size * size, st)
        else:
            merged.append((size, st))
    new_shape = tuple(size for size, _ in merged)
    new_strides = [tuple(st[k] for _, st in merged) for k in range(len(strides))]
    return new_shape, new_strides


def plan(operands: list[torch.Tensor], shape: tuple[int, ...], autotune: bool):
    """(signature, kernel index arguments) for operands broadcast to ``shape``."""
    expanded = [tuple(o.expand(shape).stride()) for o in operands]
    cshape, cstrides = collapse(tuple(shape), expanded)
    rank = len(cshape)
    contiguous = [math.prod(cshape[d + 1 :]) for d in range(rank)]
    layouts, stride_args = [], []
    max_offset = 0
    for o, st in zip(operands, cstrides):
        if o.numel() == 1 or not any(st):
            layouts.append(Layout("scalar"))  # one element, or one element broadcast everywhere
        elif list(st) == contiguous:
            layouts.append(Layout("linear"))
        else:
            dims = tuple(d for d in range(rank) if st[d] != 0)
            layouts.append(Layout("strided", dims))
            stride_args.extend(st[d] for d in dims)
            max_offset = max(max_offset, sum((cshape[d] - 1) * st[d] for d in dims))
    used_dims = sorted({d for lay in layouts for d in lay.dims})
    index_args = []
    for d in used_dims:
        index_args += [contiguous[d], cshape[d]] if d < rank - 1 else [cshape[d]]
    numel = math.prod(shape)
    index64 = max(numel, max_offset + 1) >= 2**31
    return Signature(rank, tuple(layouts), index64, autotune), index_args + stride_args


# ---- source emission ---------------------------------------------------------------------------


def _compute_dtype(dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _typed_symbols(replacements, reduced):
    """cse's temporaries carry no assumptions; give each the kind of what it stands for, so the
    printer knows integer from float arithmetic."""
    mapping = {}
    typed = []
    for symbol, expr in replacements:
        expr = expr.xreplace(mapping)
        if isinstance(expr, sympy.logic.boolalg.Boolean) and not isinstance(expr, sympy.Expr):
            new = sympy.Symbol(symbol.name)
        elif expr.is_integer:
            new = sympy.Symbol(symbol.name, integer=True)
        else:
            new = sympy.Symbol(symbol.name, real=True)
        mapping[symbol] = new
        typed.append((new, expr))
    return typed, [e.xreplace(mapping) for e in reduced]


def print_expressions(printer: TritonPrinter, exprs, prefix: str = "t"):
    """Share common subexpressions and print: (statements, one text per expression, the
    (temporary, expression) pairs bound, the expressions in terms of the temporaries)."""
    replacements, reduced = sympy.cse(list(exprs), symbols=sympy.numbered_symbols(prefix), order="none")
    replacements, reduced = _typed_symbols(replacements, reduced)
    lines, texts = [], []
    for symbol, expr in replacements:
        text = printer.print(expr)
        lines += printer.lines
        printer.lines.clear()
        lines.append(f"{symbol.name} = {text}")
    for expr in reduced:
        text = printer.print(expr)
        lines += printer.lines
        printer.lines.clear()
        texts.append(text)
    return lines, texts, replacements, reduced


def is_constant(expr) -> bool:
    return isinstance(expr, sympy.logic.boolalg.BooleanAtom) or expr.is_number


def _load_lines(names, dtypes, layouts, compute, used) -> list[str]:
    """Loads of the operands the expressions read (``used``: their names)."""
    lines = []
    for k, (name, dtype, layout) in enumerate(zip(names, dtypes, layouts)):
        if name not in used:
            continue
        if layout.kind == "linear":
            load = f"tl.load(in{k} + offs, mask=mask, other=0)"
        elif layout.kind == "scalar":
            load = f"tl.load(in{k})"
        else:
            offset = " + ".join(f"i{d} * st{k}_{d}" for d in layout.dims)
            load = f"tl.load(in{k} + ({offset}), mask=mask, other=0)"
        if dtype.is_floating_point and dtype != compute:
            load += f".to({TL_DTYPES[compute]})"
        lines.append(f"{name} = {load}")
    return lines


def _index_lines(signature: Signature) -> list[str]:
    lines = []
    used = sorted({d for lay in signature.layouts for d in lay.dims})
    for d in used:
        quotient = "offs" if d == signature.rank - 1 else f"(offs // inner{d})"
        lines.append(f"i{d} = {quotient} % size{d}" if d > 0 else f"i{d} = {quotient}")
    return lines


def _params(n_operands, n_outputs, signature: Signature) -> list[str]:
    params = [f"in{k}" for k in range(n_operands)] + [f"out{k}" for k in range(n_outputs)] + ["n"]
    used = sorted({d for lay in signature.layouts for d in lay.dims})
    for d in used:
        params += [f"inner{d}", f"size{d}"] if d < signature.rank - 1 else [f"size{d}"]
    for k, lay in enumerate(signature.layouts):
        params += [f"st{k}_{d}" for d in lay.dims]
    return params


def emit_kernel(
    name: str,
    operand_symbols,
    operand_dtypes,
    assignments: list[tuple[sympy.Symbol, sympy.Basic]],
    outputs: list[tuple[sympy.Basic, torch.dtype]],
    compute: torch.dtype,
    signature: Signature,
    header: str,
) -> str:
    """Source of one elementwise kernel: loads of the operands it reads, the assignments in
    order (common subexpressions within each shared), the stores of the outputs."""
    printer = TritonPrinter(compute)
    body = []
    block_valued = {s for s, lay in zip(operand_symbols, signature.layouts) if lay.kind != "scalar"}
    used = set()
    for symbol, expr in assignments:
        lines, (text,), replacements, _ = print_expressions(printer, [expr], prefix=f"{symbol.name}_")
        body += lines + [f"{symbol.name} = {text}"]
        used |= expr.free_symbols
        for temp, sub in replacements:
            if sub.free_symbols & block_valued:
                block_valued.add(temp)
        if expr.free_symbols & block_valued:
            block_valued.add(symbol)
    lines, texts, _, reduced = print_expressions(printer, [e for e, _ in outputs], prefix="out_")
    body += lines
    stores = []
    for k, (expr, value, (original, dtype)) in enumerate(zip(reduced, texts, outputs)):
        tl_dtype = TL_DTYPES[dtype]
        used |= original.free_symbols if not is_constant(original) else set()
        if is_constant(expr):
            value = f"tl.full([BLOCK], {value}, {tl_dtype})"
        else:
            if not (original.free_symbols & block_valued):
                value = f"tl.broadcast_to({value}, [BLOCK])"
            value = f"({value}).to({tl_dtype})"
        stores.append(f"tl.store(out{k} + offs, {value}, mask=mask)")
    used_names = {s.name for s in used}
    params = _params(len(operand_symbols), len(outputs), signature)
    program = "tl.program_id(0).to(tl.int64)" if signature.index64 else "tl.program_id(0)"
    lines = [
        f"offs = {program} * BLOCK + tl.arange(0, BLOCK)",
        "mask = offs < n",
        *_index_lines(signature),
        *_load_lines([s.name for s in operand_symbols], operand_dtypes, signature.layouts, compute, used_names),
        *body,
        *stores,
    ]
    decorator = "@triton.jit\n"
    if signature.autotune:
        configs = ", ".join(f'triton.Config({{"BLOCK": {b}}}, num_warps={w})' for b, w in GPU_CONFIGS)
        decorator = f'@triton.autotune(configs=[{configs}], key=["n"])\n' + decorator
    text = "\n".join("    " + line for line in lines)
    return (
        f"{header}\nimport triton\nimport triton.language as tl\n"
        f"{helper_source(printer.helpers)}\n\n{decorator}def {name}({', '.join(params)}, BLOCK: tl.constexpr):\n{text}\n"
    )


def _needed_steps(program: Program, roots: set) -> list[tuple[sympy.Symbol, sympy.Basic]]:
    """The forward assignments the symbols in ``roots`` depend on, in order."""
    needed = set(roots)
    keep = []
    for symbol, value in reversed(program.steps):
        if symbol in needed:
            expr = _value_expr(value)
            needed |= expr.free_symbols
            keep.append((symbol, expr))
    return keep[::-1]


def _value_expr(value: SymValue) -> sympy.Basic:
    return value.expr if value.kind is Kind.BOOL else value.number


def _header(region: Region, signature: Signature, what: str) -> str:
    described = region.describe().replace("\n", "\n#   ")
    return (
        f"# Emitted by rewrite.codegen: {what} of a pointwise region.\n"
        f"# Specialised for {signature.describe(region.operand_dtypes())}.\n#   {described}\n"
    )


def compute_dtype(region: Region) -> torch.dtype:
    return _compute_dtype(region.value_dtypes())


@functools.lru_cache(maxsize=512)
def forward_source(region: Region, signature: Signature) -> str:
    program = region.program()
    outputs = [(_value_expr(v), dt) for v, dt in zip(program.outputs, region.output_dtypes())]
    roots = set().union(*(e.free_symbols for e, _ in outputs))
    return emit_kernel(
        "pointwise_forward",
        program.operands,
        region.operand_dtypes(),
        _needed_steps(program, roots),
        outputs,
        compute_dtype(region),
        signature,
        _header(region, signature, "forward"),
    )


def differentiable_outputs(region: Region) -> list[int]:
    return [k for k, dt in enumerate(region.output_dtypes()) if dt.is_floating_point]


def differentiable_operands(region: Region) -> list[int]:
    return [k for k, dt in enumerate(region.operand_dtypes()) if dt.is_floating_point]


@dataclass(frozen=True)
class Backward:
    """The backward of a region by reverse accumulation over its steps: ``grads`` are the
    symbols of the incoming gradients (one per float output), ``adjoints`` the assignments
    ``d_v = sum over users u of d_u * du/dv`` in reverse order, ``operand_grads`` one
    expression per float operand, ``forward`` the forward assignments they read."""

    grads: tuple[sympy.Symbol, ...]
    forward: tuple[tuple[sympy.Symbol, sympy.Basic], ...]
    adjoints: tuple[tuple[sympy.Symbol, sympy.Basic], ...]
    operand_grads: tuple[sympy.Basic, ...]


@functools.lru_cache(maxsize=256)
def backward_program(region: Region) -> Backward:
    program = region.program()
    outputs = differentiable_outputs(region)
    grads = tuple(sympy.Symbol(f"g{j}", real=True) for j in outputs)
    terms: dict[sympy.Symbol, list] = {}
    for g, j in zip(grads, outputs):
        terms.setdefault(program.outputs[j].expr, []).append(g)
    adjoints = []
    for symbol, value in reversed(program.steps):
        if symbol not in terms or value.kind is not Kind.FLOAT:
            continue
        adjoint = sympy.Symbol(f"d_{symbol.name}", real=True)
        adjoints.append((adjoint, sympy.Add(*terms[symbol])))
        expr = value.number
        for arg in sorted(expr.free_symbols, key=lambda s: s.name):
            if program.kind_of(arg) is not Kind.FLOAT:
                continue
            partial = sympy.diff(expr, arg)
            if partial == 0:
                continue
            # sigmoid' = s(1 - s), exp' = exp, tanh' = 1 - tanh^2: read the forward value.
            partial = partial.xreplace({expr: symbol})
            terms.setdefault(arg, []).append(adjoint * partial)
    operand_grads = tuple(
        sympy.Add(*terms.get(program.operands[k], [])) for k in differentiable_operands(region)
    )
    reads = set().union(*(e.free_symbols for _, e in adjoints), *(e.free_symbols for e in operand_grads))
    return Backward(grads, tuple(_needed_steps(program, reads)), tuple(adjoints), operand_grads)


@functools.lru_cache(maxsize=256)
def inputs_needed_by_backward(region: Region) -> tuple[bool, ...]:
    """Per region input: whether the backward kernel reads its values. ``x * 0.5 + r`` needs
    neither x nor r; the fused op keeps only what its backward reads, not every intermediate
    and input."""
    backward = backward_program(region)
    reads = set().union(
        *(e.free_symbols for _, e in backward.forward + backward.adjoints), *(e.free_symbols for e in backward.operand_grads)
    )
    needed = [False] * len(region.input_dtypes)
    for symbol, root in zip(region.program().operands, region.operand_roots()):
        if symbol in reads:
            needed[root] = True
    return tuple(needed)


def backward_dtypes(region: Region, reduced: tuple[bool, ...]) -> list[torch.dtype]:
    """Gradients of operands that are broadcast get summed afterwards: keep them in float32
    (or float64) so that the sum does not accumulate in half precision."""
    dtypes = region.operand_dtypes()
    out = []
    for k, needs_sum in zip(differentiable_operands(region), reduced):
        dt = dtypes[k]
        out.append(torch.promote_types(dt, torch.float32) if needs_sum else dt)
    return out


@functools.lru_cache(maxsize=512)
def backward_source(region: Region, signature: Signature, reduced: tuple[bool, ...]) -> str:
    backward = backward_program(region)
    out_dtypes = region.output_dtypes()
    grad_dtypes = [out_dtypes[j] for j in differentiable_outputs(region)]
    return emit_kernel(
        "pointwise_backward",
        region.program().operands + backward.grads,
        list(region.operand_dtypes()) + grad_dtypes,
        list(backward.forward + backward.adjoints),
        list(zip(backward.operand_grads, backward_dtypes(region, reduced))),
        compute_dtype(region),
        signature,
        _header(region, signature, "backward"),
    )


# ---- launching ---------------------------------------------------------------------------------


def _check_launchable(region: Region, tensors) -> None:
    if interpreted() and torch.bfloat16 in region.value_dtypes():
        raise UnsupportedRegion(
            "bfloat16 is not supported by Triton's CPU interpreter (TRITON_INTERPRET=1); "
            "use float16/float32 there, or run on a GPU"
        )
    for t in tensors:
        if t.layout != torch.strided:
            raise UnsupportedRegion(f"a {t.layout} tensor cannot be indexed by a pointwise kernel; pass dense tensors")


def _run(source: str, signature: Signature, name: str, operands, outputs, n: int, index_args) -> None:
    from torch.library import wrap_triton

    module = cache.load(source, signature.describe([o.dtype for o in operands]))
    kernel = wrap_triton(getattr(module, name))
    if signature.autotune:
        grid = lambda meta: (-(-n // meta["BLOCK"]),)  # noqa: E731 - triton's grid callback
        args = dict()
    else:
        block = min(INTERPRETER_MAX_BLOCK, max(16, 1 << (n - 1).bit_length()))
        grid = (-(-n // block),)
        args = dict(BLOCK=block)
    with on_device(outputs[0]), _quiet_interpreter():
        kernel[grid](*operands, *outputs, n, *index_args, **args)


def _quiet_interpreter():
    """Masked-off lanes load zeros and may divide by them; the interpreter computes them with
    numpy, which warns. Their results are never stored."""
    if not interpreted():
        return contextlib.nullcontext()
    import numpy

    return numpy.errstate(all="ignore")


def _autotune(device: torch.device) -> bool:
    """Block sizes are autotuned on a GPU; under the interpreter a heuristic picks them."""
    return device.type == "cuda" and not interpreted()


def launch_forward(region: Region, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    check_inputs(region, inputs)
    _check_launchable(region, inputs)
    operands, shape = region.iteration(inputs)
    region.check_output_shapes([tuple(o.shape) for o in operands], shape)
    device = operands[0].device
    outputs = [torch.empty(shape, dtype=dt, device=device) for dt in region.output_dtypes()]
    n = math.prod(shape)
    if n == 0:
        return outputs
    signature, index_args = plan(operands, shape, _autotune(device))
    _run(forward_source(region, signature), signature, "pointwise_forward", operands, outputs, n, index_args)
    return outputs


def launch_backward(region: Region, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of the region's float operands (its inputs after their views), each summed
    to the operand's shape, given those of its float outputs."""
    check_inputs(region, inputs)
    _check_launchable(region, inputs)
    operands, shape = region.iteration(inputs)
    float_operands = [operands[k] for k in differentiable_operands(region)]
    reduced = tuple(tuple(o.shape) != shape or not o.is_contiguous() for o in float_operands)
    device = operands[0].device
    n = math.prod(shape)
    grad_operands = [torch.empty(shape, dtype=dt, device=device) for dt in backward_dtypes(region, reduced)]
    if n:
        kernel_operands = list(operands) + list(grads)
        signature, index_args = plan(kernel_operands, shape, _autotune(device))
        source = backward_source(region, signature, reduced)
        _run(source, signature, "pointwise_backward", kernel_operands, grad_operands, n, index_args)
    return [
        g.sum_to_size(o.shape).to(o.dtype).contiguous() if needs_sum else g
        for o, g, needs_sum in zip(float_operands, grad_operands, reduced)
    ]


def reference_backward(region: Region, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """What the backward kernel computes, evaluated with PyTorch ops (same assignments, same
    compute type, same inputs read): the path without kernels, traceable by compile."""
    from codegen.evaluate import evaluate

    operands, shape = region.iteration(inputs)
    compute = compute_dtype(region)
    program, backward = region.program(), backward_program(region)
    env = {}
    for symbol, operand in zip(program.operands, operands):
        env[symbol] = operand.to(compute) if operand.is_floating_point() else operand
    for symbol, grad in zip(backward.grads, grads):
        env[symbol] = grad.to(compute)
    for symbol, expr in backward.forward + backward.adjoints:
        (env[symbol],) = evaluate([expr], env, compute)
    results = evaluate(list(backward.operand_grads), env, compute)
    float_operands = [operands[k] for k in differentiable_operands(region)]
    out = []
    for operand, value in zip(float_operands, results):
        full = torch.as_tensor(value, dtype=compute, device=operand.device).expand(shape)
        # A copy always: the value may be an incoming gradient itself, and an op must not
        # return its inputs (compilers assume it does not).
        out.append(full.sum_to_size(operand.shape).to(operand.dtype).clone(memory_format=torch.contiguous_format))
    return out


# ---- the public entry point -------------------------------------------------------------------


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class PointwiseKernel:
    """A pointwise region compiled to Triton: call it like the function it came from.

    Calls go through ``torch.ops.rewrite.pointwise`` (differentiable; exported and compiled
    as one op). ``source`` / ``backward_source`` are the kernels emitted for the example
    tensors' dtypes and layouts; ``source_for(*tensors)`` gives them for other tensors.
    """

    def __init__(self, region: Region, examples, device: torch.device):
        self.region = region
        self.spec = region.to_spec()
        self._examples = [_meta_like(t) for t in examples]
        self._device = device
        self._single = len(region.outputs) == 1

    def __call__(self, *tensors: torch.Tensor):
        check_inputs(self.region, tensors)
        outputs = torch.ops.rewrite.pointwise(list(tensors), self.spec)
        return outputs[0] if self._single else tuple(outputs)

    def _signature(self, tensors, extra=()):
        operands, shape = self.region.iteration([_meta_like(t) for t in tensors])
        device = tensors[0].device if tensors else self._device
        return operands, shape, plan(list(operands) + list(extra), shape, _autotune(device))[0]

    def source_for(self, *tensors: torch.Tensor) -> str:
        check_inputs(self.region, tensors)
        _, _, signature = self._signature(tensors)
        return forward_source(self.region, signature)

    def backward_source_for(self, *tensors: torch.Tensor) -> str:
        check_inputs(self.region, tensors)
        # As the op saves them for its backward: inputs the gradients do not read are stand-ins.
        needed = inputs_needed_by_backward(self.region)
        tensors = [t if keep else _meta_like(t).new_ones(()).expand(t.shape) for t, keep in zip(tensors, needed)]
        operands, shape, _ = self._signature(tensors)
        grads = [torch.empty(shape, dtype=self.region.output_dtypes()[j], device="meta")
                 for j in differentiable_outputs(self.region)]  # fmt: skip
        _, _, signature = self._signature(tensors, grads)
        float_operands = [operands[k] for k in differentiable_operands(self.region)]
        reduced = tuple(tuple(o.shape) != shape or not o.is_contiguous() for o in float_operands)
        return backward_source(self.region, signature, reduced)

    @property
    def source(self) -> str:
        return self.source_for(*self._examples)

    @property
    def backward_source(self) -> str:
        return self.backward_source_for(*self._examples)

    def __repr__(self) -> str:
        return f"PointwiseKernel({len(self.region.input_dtypes)} inputs, {len(self.region.steps)} ops)"


def check_inputs(region: Region, tensors) -> None:
    if len(tensors) != len(region.input_dtypes):
        raise TypeError(f"the kernel takes {len(region.input_dtypes)} tensors, got {len(tensors)}")
    for k, (t, dtype) in enumerate(zip(tensors, region.input_dtypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"input {k} ({region.input_names[k]}) must be a tensor, got {type(t).__name__}")
        if str(t.dtype).removeprefix("torch.") != dtype:
            raise TypeError(
                f"input {k} ({region.input_names[k]}) is {t.dtype}; the kernel was made for {dtype}: "
                "make another one from examples of this dtype"
            )


def pointwise(fn, *example_tensors: torch.Tensor) -> PointwiseKernel:
    """Capture ``fn`` (a function of tensors made of elementwise ops) and compile it.

    Raises ``UnsupportedRegion`` naming the node when ``fn`` holds something the emitter
    cannot express (a reduction, a matmul, a complex dtype, a view of a computed value...).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if not example_tensors or not all(isinstance(t, torch.Tensor) for t in example_tensors):
        raise TypeError("codegen.pointwise(fn, *example_tensors) needs at least one example tensor, and only tensors")
    # Distinct stand-ins: make_fx maps one tensor object to one proxy, so fn(e, e) would
    # otherwise trace as a function of a single input.
    stand_ins = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in example_tensors]
    try:
        gm = make_fx(fn, tracing_mode="fake")(*stand_ins)
    except Exception as exc:  # noqa: BLE001 - any capture failure is reported the same way
        raise UnsupportedRegion(f"could not capture {getattr(fn, '__name__', fn)!r} with make_fx: {exc}") from None
    region = Region.from_graph(gm)
    region.check_shapes([_meta_like(t) for t in example_tensors])
    return PointwiseKernel(region, example_tensors, example_tensors[0].device)
