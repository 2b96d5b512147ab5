"""Emitted Triton kernels against eager PyTorch and torch.compile, side by side in one process.

Three regions, each memory-bound, so the measure is achieved bytes per second (each input
read once, each output written once, over the median time) next to the device's measured
copy bandwidth (a large device-to-device copy, bytes read plus written):

- gelu_pack: GELU forward and its 2-bit codes packed four to a byte (approx_bp's ReGELU2,
  codegen's packed2 template); reads x, writes y and n/4 bytes of codes.
- poly2: a degree-2 polynomial activation 0.125 x^2 + 0.5 x + 0.25 and its backward
  (codegen.pointwise, forward and backward kernels); forward reads x and writes y, backward
  reads x and the incoming gradient and writes dx.
- bias_act_res: gelu(x + bias) + residual with a [C] bias broadcast over [N, C] rows
  (codegen.pointwise); reads x and the residual, writes y.

The baselines compute the same thing: eager PyTorch op by op, and torch.compile of the eager
function (Inductor). Aims on a GPU: ours >= 85% of copy bandwidth and >= 1.0x torch.compile.

Without a GPU the script runs its correctness mode instead: every kernel under Triton's CPU
interpreter against the eager float64 computation, at small sizes (no timings: the
interpreter says nothing about speed).

    python benchmarks/codegen.py                        # GPU if present, else the correctness mode
    python benchmarks/codegen.py --sizes 16M,64M,256M --dtype bfloat16
    python benchmarks/codegen.py --check                # the correctness mode, on any machine
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (through rewrite)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

import codegen  # noqa: E402
import rewrite  # noqa: E402, F401 - registers torch.ops.rewrite.*
from rewrite.ops.step_activation import REGELU2, pack2, step_codes  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = 4096  # the row length of bias_act_res


def poly2(x):
    return 0.125 * x * x + 0.5 * x + 0.25


def poly2_backward(x, g):
    return g * (0.25 * x + 0.5)


def gelu_pack_eager(x):
    return F.gelu(x), pack2(step_codes(x.reshape(-1), REGELU2.c))


def bias_act_res(x, bias, residual):
    return F.gelu(x + bias) + residual


class Region:
    """One benchmarked region: how to make inputs, run ours / eager / compiled, and count bytes."""

    def __init__(self, name, make_inputs, ours, eager, compiled, bytes_moved, reference):
        self.name, self.make_inputs, self.ours, self.eager = name, make_inputs, ours, eager
        self.compiled, self.bytes_moved, self.reference = compiled, bytes_moved, reference


def regions(device: str, dtype: torch.dtype, compile_baselines: bool) -> list[Region]:
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    size = torch.tensor([], dtype=dtype).element_size()
    example = randn(8)
    poly_kernel = codegen.pointwise(poly2, example)
    poly_spec = poly_kernel.spec
    bias_kernel = codegen.pointwise(bias_act_res, randn(2, COLUMNS), randn(COLUMNS), randn(2, COLUMNS))
    compile_ = torch.compile if compile_baselines else (lambda fn: fn)

    def poly2_ours(x, g):
        (y,) = torch.ops.rewrite.pointwise([x], poly_spec)
        (dx,) = torch.ops.rewrite.pointwise_backward([x], [g], poly_spec)
        return y, dx

    def poly2_eager(x, g):
        return poly2(x), poly2_backward(x, g)

    poly2_forward_compiled, poly2_backward_compiled = compile_(poly2), compile_(poly2_backward)
    gelu_pack_compiled = compile_(gelu_pack_eager)
    bias_compiled = compile_(bias_act_res)

    def rows_cols(n):
        cols = min(COLUMNS, max(n, 1))
        return -(-max(n, 1) // cols), cols

    def bias_inputs(n):
        rows, cols = rows_cols(n)
        return randn(rows, cols), randn(cols), randn(rows, cols)

    return [
        Region(
            "gelu_pack",
            lambda n: (randn(n),),
            lambda x: torch.ops.rewrite.regelu2(x),
            gelu_pack_eager,
            gelu_pack_compiled,
            lambda n: 2 * n * size + (n + 3) // 4,
            lambda x: (F.gelu(x.double()), pack2(step_codes(x.reshape(-1), REGELU2.c))),
        ),
        Region(
            "poly2 fwd+bwd",
            lambda n: (randn(n), randn(n)),
            poly2_ours,
            poly2_eager,
            lambda x, g: (poly2_forward_compiled(x), poly2_backward_compiled(x, g)),
            lambda n: 5 * n * size,
            lambda x, g: (poly2(x.double()), poly2_backward(x.double(), g.double())),
        ),
        Region(
            "bias_act_res",
            bias_inputs,
            bias_kernel,
            bias_act_res,
            bias_compiled,
            lambda n: 3 * math.prod(rows_cols(n)) * size,
            lambda x, b, r: bias_act_res(x.double(), b.double(), r.double()),
        ),
    ]


def relative_error(out, ref) -> float:
    if out.dtype == torch.uint8:  # packed codes must be equal
        return 0.0 if torch.equal(out.cpu(), ref.cpu()) else float("inf")
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def check(region: Region, n: int, use_kernels: bool) -> tuple[float, int]:
    """(worst relative error of ours against the float64 reference on fresh random inputs,
    elements of the first input)."""
    inputs = region.make_inputs(n)
    with codegen.use_triton_on_cpu(use_kernels):
        outs = as_tuple(region.ours(*inputs))
    refs = as_tuple(region.reference(*inputs))
    return max(relative_error(o, r) for o, r in zip(outs, refs)), inputs[0].numel()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def correctness_mode(dtype: torch.dtype) -> None:
    print(f"No GPU: correctness mode, kernels under Triton's CPU interpreter, {dtype}.")
    print(f"{'region':<16}{'elements':>10}  {'rel. error vs float64':>22}  ok")
    failed = False
    for region in regions("cpu", dtype, compile_baselines=False):
        for n in (1, 4097, 65536 + 7):
            err, elements = check(region, n, use_kernels=True)
            ok = err < tolerance(dtype)
            failed |= not ok
            print(f"{region.name:<16}{elements:>10}  {err:>22.2e}  {'yes' if ok else 'NO'}")
    if failed:
        raise SystemExit("a kernel disagrees with the reference")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * scale


def bench(fn, input_sets) -> float:
    """Median seconds of ``fn`` over rotating input sets (so repeated runs do not read L2)."""
    import triton.testing

    fn(*input_sets[0])  # compile and autotune before do_bench sizes its repetitions
    torch.cuda.synchronize()
    state = {"k": 0}

    def call():
        fn(*input_sets[state["k"] % len(input_sets)])
        state["k"] += 1

    return triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median") / 1e3


def copy_bandwidth(n_bytes: int) -> float:
    src = torch.empty(n_bytes // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    seconds = bench(lambda s: dst.copy_(s), [(src,)])
    return 2 * src.numel() * 4 / seconds


def gpu_mode(sizes: list[int], dtype: torch.dtype) -> None:
    name = torch.cuda.get_device_name()
    largest = max(sizes)
    copy_bw = copy_bandwidth(largest * torch.tensor([], dtype=dtype).element_size())
    print(f"{name}; torch {torch.__version__}; {dtype}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    l2_bytes = 64 << 20
    header = (
        f"{'region':<16}{'elements':>10}{'err':>10}{'ours GB/s':>11}{'eager GB/s':>12}{'compile GB/s':>14}"
        f"{'ours/copy':>11}{'ours/compile':>14}"
    )
    print(header)
    for region in regions("cuda", dtype, compile_baselines=True):
        for n in sizes:
            err, _ = check(region, min(n, 1 << 22), use_kernels=True)
            if err >= tolerance(dtype):
                raise SystemExit(f"{region.name}: relative error {err:.2e} against float64")
            bytes_moved = region.bytes_moved(n)
            sets = [region.make_inputs(n) for _ in range(max(1, min(4, (4 * l2_bytes) // max(bytes_moved, 1))))]
            times = {label: bench(fn, sets) for label, fn in (("ours", region.ours), ("eager", region.eager), ("compile", region.compiled))}
            bw = {label: bytes_moved / t for label, t in times.items()}
            print(
                f"{region.name:<16}{n / (1 << 20):>9.0f}M{err:>10.1e}{bw['ours'] / 1e9:>11.0f}{bw['eager'] / 1e9:>12.0f}"
                f"{bw['compile'] / 1e9:>14.0f}{bw['ours'] / copy_bw:>10.0%}{times['compile'] / times['ours']:>13.2f}x"
            )
            del sets
            torch.cuda.empty_cache()
    print("aims: ours >= 85% of copy bandwidth and >= 1.0x torch.compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,64M,256M", help="element counts on the GPU (K/M/G suffixes)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="element type")
    parser.add_argument("--check", action="store_true", help="the CPU-interpreter correctness mode, even with a GPU")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    if args.check or not torch.cuda.is_available():
        if dtype == torch.bfloat16:
            raise SystemExit("--dtype bfloat16: the CPU interpreter has no bfloat16; use float32 or float16 there")
        correctness_mode(dtype)
    else:
        gpu_mode([parse_size(s) for s in args.sizes.split(",")], dtype)


if __name__ == "__main__":
    main()
