"""The ``rewrite`` command: list passes, rewrite a checkpoint, inspect a file, run the demo.

    rewrite passes
    rewrite run model.pt2 -p approx_bp -o out.pt2 --report report.html
    rewrite run weights.safetensors --model mypkg.models:build --input-shape 8,3,224,224 -p approx_bp{norms=false} -o out.pt2
    rewrite inspect out.pt2 --kernels
    rewrite demo

Errors in the input (files, options, models) print one line, ``error: ...``, and exit with
status 2; nothing is written and the input is left untouched.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from rewrite.errors import CheckpointError, OptionError, RewriteError
from rewrite.progress import Progress

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


# -- passes -------------------------------------------------------------------------------


def _format_pass_help() -> str:
    from rewrite.pass_infra import format_value, option_help, pass_class, pass_names

    lines = []
    for name in pass_names():
        cls = pass_class(name)
        lines.append(f"{name}: {cls.summary()}")
        for f in cls.options():
            lines.append(f"    {f.name}={format_value(f.default)}  {option_help(cls, f)}")
    return "\n".join(lines)


def cmd_passes(args) -> int:
    print(_format_pass_help())
    print("\nUse: -p name or -p 'name{option=value,option=value}'; several passes run in order: -p a -p b")
    return 0


# -- run ----------------------------------------------------------------------------------


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if not shape or any(s < 1 for s in shape):
        raise OptionError(
            f"--input-shape {text!r}: write the sizes as integers of at least 1 separated by commas, e.g. 8,3,224,224"
        )
    return shape


def _available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable, else all of it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_inputs(shapes: list[str], dtypes: list[str], int_high: int) -> tuple:
    """Random example inputs (seed 0) of the given shapes and dtypes."""
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise OptionError(f"give one --input-dtype for all inputs or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    names = [(dtypes[i] if len(dtypes) > 1 else dtypes[0]) if dtypes else "float32" for i in range(len(shapes))]
    for name in names:
        if name not in _DTYPES:
            raise OptionError(f"--input-dtype {name!r} is not one of: {', '.join(_DTYPES)}")
    shapes_ = [_parse_shape(text) for text in shapes]
    # The rewrite runs the model several times on these and keeps copies: allow a quarter of the memory.
    needed = sum(math.prod(shape) * _DTYPES[name].itemsize for shape, name in zip(shapes_, names))
    available = _available_memory()
    if needed > available // 4:
        raise OptionError(
            f"--input-shape {' '.join(shapes)}: the inputs alone take {needed / 2**30:.3g} GiB, more than a quarter of "
            f"the {available / 2**30:.3g} GiB of memory available; give smaller shapes (a small batch is enough to rewrite)"
        )
    integer_names = [name for name in names if not _DTYPES[name].is_floating_point and name != "bool"]
    if integer_names:
        if int_high < 1:
            raise OptionError(f"--int-high {int_high}: integer inputs are drawn from [0, N); N must be at least 1")
        limit = min(torch.iinfo(_DTYPES[name]).max for name in integer_names) + 1
        if int_high > limit:
            raise OptionError(f"--int-high {int_high}: larger than {', '.join(integer_names)} can hold ({limit})")
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for shape, name in zip(shapes_, names):
        dtype = _DTYPES[name]
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype is torch.bool:
            inputs.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            inputs.append(torch.randint(0, int_high, shape, generator=generator, dtype=dtype))
    return tuple(inputs)


def _import_factory(spec: str, option: str = "--model", returns: str = "the nn.Module"):
    module_name, _, attr = spec.partition(":")
    if not (module_name and attr and all(part.isidentifier() for part in module_name.split("."))
            and attr.isidentifier()):
        raise OptionError(
            f"{option} {spec!r}: write it as package.module:factory (an importable module, not a file path, and a "
            f"function in it that returns {returns})"
        )
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OptionError(f"{option} {spec!r}: cannot import {module_name}: {exc}") from exc
    except SyntaxError as exc:
        raise OptionError(f"{option} {spec!r}: {exc.filename}, line {exc.lineno}: syntax error: {exc.msg}") from exc
    except (Exception, SystemExit) as exc:  # the user's module raised (or exited) while being imported
        raise OptionError(f"{option} {spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise OptionError(f"{option} {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def load_data(spec: str | None) -> tuple:
    """``(data, eval_data)`` from ``--data pkg.mod:factory``: the factory returns the training
    batches, or a pair (training batches, evaluation batches)."""
    if spec is None:
        return None, None
    returns = "the batches (e.g. a DataLoader), or a pair (training batches, evaluation batches)"
    factory = _import_factory(spec, "--data", returns)
    try:
        made = factory()
    except (Exception, SystemExit) as exc:
        raise OptionError(f"--data {spec}: calling it failed: {type(exc).__name__}: {exc}") from exc
    data, eval_data = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if data is None:
        raise OptionError(f"--data {spec}: returned None; it must return {returns}")
    return data, eval_data


def build_model(spec: str, kwargs_json: str | None, state: dict, source: Path) -> torch.nn.Module:
    factory = _import_factory(spec)
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise OptionError(f"--model-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise OptionError("--model-kwargs must be a JSON object, e.g. '{\"dim\": 256}'")
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as exc:  # the user's code may call sys.exit
        raise OptionError(f"--model {spec}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"--model {spec}: returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        mismatches = [line.strip().rstrip(".") for line in str(exc).splitlines() if "size mismatch" in line]
        detail = "; ".join(mismatches[:3]) + (f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else "")
        raise CheckpointError(f"{source}: does not fit the model from {spec}: {detail or str(exc).strip().splitlines()[0]}") from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise CheckpointError(f"{source}: does not fit the model from {spec}: " + "; ".join(parts))
    return model


def _check_output(option: str, path: Path, suffixes: tuple[str, ...], what: str) -> None:
    """Fail before the (long) rewrite when the result could not be written."""
    if path.suffix not in suffixes:
        raise OptionError(f"{option} {path}: {what} is written as {suffixes[0]}; give a name ending in {suffixes[0]}")
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a folder; give a file name ending in {suffixes[0]}")
    if not path.parent.is_dir():
        raise OptionError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: the folder {path.parent} is not writable")


def _check_outputs(args) -> None:
    source, out = Path(args.input), Path(args.output)
    _check_output("-o", out, (".pt2",), "the rewritten model")
    if source.exists() and out.exists() and out.resolve() == source.resolve():
        raise OptionError(f"-o {out}: is the input file; write the result to a new file")
    if args.report is not None:
        _check_output("--report", Path(args.report), (".html", ".htm"), "the report")


def cmd_run(args) -> int:
    from rewrite.api import optimize
    from rewrite.html_report import render_html
    from rewrite.pass_infra import resolve_passes
    from rewrite.serialize import (
        STATE_DICT_SUFFIXES,
        atomic_write,
        inputs_mismatch,
        load,
        load_state_dict,
        program_bytes,
    )

    progress = Progress(not args.quiet)
    _check_outputs(args)
    passes = resolve_passes(args.passes or [])
    source = Path(args.input)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file")
    progress(f"loading {source}")
    if source.suffix == ".pt2":
        if args.model:
            raise OptionError("--model is for state dicts (.pt, .safetensors); a .pt2 holds its own graph")
        model = load(source)
        example_args, example_kwargs = model.example_inputs
        if args.input_shape:
            example_args, example_kwargs = make_inputs(args.input_shape, args.input_dtype, args.int_high), {}
            mismatch = inputs_mismatch(model, example_args, example_kwargs)
            if mismatch:
                raise OptionError(f"--input-shape/--input-dtype do not fit {source}: {mismatch}")
        if not example_args and not example_kwargs:
            raise OptionError(f"{source}: holds no example inputs; give them with --input-shape (and --input-dtype)")
        if args.mode:
            model.train(args.mode == "train")
    elif source.suffix in STATE_DICT_SUFFIXES:
        if not args.model:
            raise OptionError(
                f"{source}: a state dict holds weights only; name the model with --model package.module:factory "
                "and its input with --input-shape"
            )
        if not args.input_shape:
            raise OptionError("--input-shape is needed with --model: the shape of the model's input, e.g. 8,3,224,224")
        state = load_state_dict(source)
        model = build_model(args.model, args.model_kwargs, state, source)
        example_args, example_kwargs = make_inputs(args.input_shape, args.input_dtype, args.int_high), {}
    else:
        raise CheckpointError(f"{source}: unknown file type {source.suffix!r}; rewrite reads .pt2, {', '.join(STATE_DICT_SUFFIXES)}")

    data, eval_data = load_data(args.data)
    rewritten = optimize(
        model,
        passes,
        example_args,
        example_kwargs,
        mode=args.mode or ("train" if model.training else "eval"),
        dynamic_batch=not args.static_batch,
        verify=not args.no_verify,
        progress=progress,
        codegen={"auto": None, "on": True, "off": False}[args.codegen],
        data=data,
        eval_data=eval_data,
    )
    progress(f"saving {args.output}")
    files = {args.output: program_bytes(rewritten)}
    if args.report:
        files[args.report] = render_html(rewritten.report)
    atomic_write(files)  # all or nothing: no model without its report
    if args.report:
        progress(f"wrote {args.report}")
    print(rewritten.report)
    return 0


# -- inspect ------------------------------------------------------------------------------


def _inspect_program(path: Path, show_graph: bool, show_kernels: bool = False) -> None:
    from rewrite.diff import graph_lines
    from rewrite.graph import describe_value, op_name
    from rewrite.report import format_bytes
    from rewrite.serialize import load_program

    program, report = load_program(path)
    signature = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    print(f"{path}: torch.export program, {format_bytes(path.stat().st_size)}")
    for name in signature.user_inputs:
        print(f"  input  {name}: {describe_value(nodes[name].meta.get('val'))}")
    for name in signature.user_outputs:
        node = nodes.get(name)
        print(f"  output {name}: {describe_value(node.meta.get('val')) if node is not None else ''}")
    params = list(program.state_dict.values())
    total = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    print(f"  parameters and buffers: {len(params)} tensors, {total:,} values, {format_bytes(nbytes)}")
    ops = Counter(op_name(n) for n in program.graph.nodes if n.op == "call_function")
    ours = {k: v for k, v in ops.items() if k.startswith("rewrite.")}
    print("  ops: " + ", ".join(f"{k} x{v}" for k, v in ops.most_common(12)) + (" ..." if len(ops) > 12 else ""))
    if ours:
        print("  rewrite ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ours.items())))
    if report:
        print(f"  rewritten from {report.get('model', '?')} ({report.get('mode', '?')} mode):")
        for p in report["passes"]:
            changes, skipped = (p.get(key) if isinstance(p.get(key), list) else [] for key in ("changes", "skipped"))
            line = f"    {p.get('spec', '?')}: {len(changes)} changed, {len(skipped)} left alone, {p.get('kind', '?')}"
            numerics = p.get("numerics") if isinstance(p.get("numerics"), dict) else {}
            before, after = numerics.get("activation_bytes_before"), numerics.get("activation_bytes_after")
            if _is_number(before) and _is_number(after):
                line += f"; saved for backward {format_bytes(before)} -> {format_bytes(after)}"
            if _is_number(numerics.get("grad_rel_error")):
                line += f"; gradient error {numerics['grad_rel_error']:.3g}"
            if isinstance(numerics.get("grad_untested"), str):
                line += f"; gradients NOT TESTED ({numerics['grad_untested']})"
            print(line)
        eager = report.get("activation_bytes_eager")
        if _is_number(eager):
            print(f"  {report.get('model', '?')} run eagerly saves {format_bytes(eager)} for backward")
        if isinstance(report.get("fixed_mode"), str):
            print(f"  stays in {report.get('mode', '?')} mode: {report['fixed_mode']}")
    if show_graph:
        print("\n".join(graph_lines(program.module())))
    if show_kernels:
        from rewrite.kernel_listing import format_listings, kernel_listings

        print(format_listings(kernel_listings(program.graph)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _inspect_state_dict(path: Path) -> None:
    from rewrite.graph import describe_value
    from rewrite.report import format_bytes
    from rewrite.serialize import load_state_dict

    state = load_state_dict(path)
    total = sum(t.numel() for t in state.values())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"{path}: state dict, {len(state)} tensors, {total:,} values, {format_bytes(nbytes)}")
    width = max((len(k) for k in state), default=0)
    for name, tensor in state.items():
        print(f"  {name:<{width}}  {describe_value(tensor)}")


def cmd_inspect(args) -> int:
    from rewrite.serialize import STATE_DICT_SUFFIXES

    path = Path(args.file)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if args.json:
        if path.suffix != ".pt2":
            raise OptionError(f"{path}: --json prints the report saved in a rewritten .pt2; a state dict holds none")
        from rewrite.serialize import load_program

        _, report = load_program(path)
        if report is None:
            raise CheckpointError(f"{path}: holds no rewrite report (it was not written by rewrite)")
        print(json.dumps(report, indent=2))
    elif path.suffix == ".pt2":
        _inspect_program(path, args.graph, args.kernels)
    elif path.suffix in STATE_DICT_SUFFIXES:
        if args.kernels:
            raise OptionError(f"{path}: --kernels needs a rewritten .pt2 (a state dict holds no graph)")
        _inspect_state_dict(path)
    else:
        raise CheckpointError(f"{path}: unknown file type {path.suffix!r}; rewrite reads .pt2, {', '.join(STATE_DICT_SUFFIXES)}")
    return 0


# -- demo ---------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from rewrite import zoo
    from rewrite.api import optimize
    from rewrite.diff import graph_diff
    from rewrite.html_report import write_html
    from rewrite.serialize import load, save

    progress = Progress(True)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: is a file; give a folder for the .pt2 and report.html")
    if not 2 <= args.batch <= 1024:  # torch.export specialises a batch of 1
        raise OptionError(f"--batch {args.batch}: give a batch size from 2 to 1024")
    model, inputs = zoo.build(args.model, batch=args.batch)
    print(f"model: {args.model}: {zoo.BUILTIN[args.model]}, {sum(p.numel() for p in model.parameters()):,} parameters")
    rewritten = optimize(model, args.passes or ["approx_bp"], inputs, mode="train", progress=progress)

    print("\n== graph before -> after (changed nodes marked - / +) ==")
    print(graph_diff(rewritten.before, rewritten.after, context=1))
    print("\n== report ==")
    print(rewritten.report)

    # It trains: one optimizer step on a made-up target.
    optimizer = torch.optim.SGD(rewritten.parameters(), lr=1e-2)
    loss = rewritten(*inputs).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    print(f"\none SGD step on the rewritten model: loss {loss.item():.4f}, "
          f"{sum(p.grad is not None for p in rewritten.parameters())}/{len(list(rewritten.parameters()))} parameters got gradients")

    try:  # made only now: a demo that fails leaves no empty folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"--out {out}: cannot make the folder: {exc.strerror or exc}") from exc
    saved = save(rewritten, out / f"{args.model}.pt2")
    reloaded = load(saved)
    same = torch.equal(reloaded(*inputs), rewritten(*inputs))
    report_path = write_html(rewritten.report, out / "report.html")
    print(f"saved {saved} (reloaded: outputs {'equal' if same else 'DIFFER'}); HTML report: {report_path}")
    return 0


# -- entry point --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewrite",
        description="Rewrite PyTorch models: capture as a graph, run passes, write a drop-in .pt2 and a report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("passes", help="list the passes, what they do and their options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser(
        "run",
        help="rewrite a model file and write the result as .pt2",
        description="Rewrite INPUT (a .pt2 from torch.export, or a state dict with --model) with the passes given by -p.",
        epilog="pass options: " + " ; ".join(_format_pass_help().splitlines()),
    )
    p.add_argument("input", help="a .pt2 (torch.export) or a state dict (.pt, .pth, .bin, .safetensors; needs --model)")
    p.add_argument("-p", "--pass", dest="passes", action="append", required=True, metavar="SPEC",
                   help="a pass with options, e.g. approx_bp or 'approx_bp{norms=false}'; repeat to run several in order")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten model (.pt2)")
    p.add_argument("--report", help="also write an HTML report here (.html)")
    p.add_argument("--model", help="for a state dict: package.module:factory, a function returning the nn.Module the weights fit")
    p.add_argument("--model-kwargs", help="JSON object of keyword arguments for the factory, e.g. '{\"dim\": 256}'")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="shape of a model input, e.g. 8,3,224,224; repeat for several inputs (random values, seed 0). "
                        "Needed with --model; for a .pt2 it replaces the example inputs saved in it")
    p.add_argument("--input-dtype", action="append", default=[], metavar="DTYPE",
                   help=f"dtype of the inputs (one for all, or one per --input-shape): {', '.join(_DTYPES)}; default float32")
    p.add_argument("--int-high", type=int, default=2, metavar="N",
                   help="integer inputs are drawn from [0, N): set it to the vocabulary size for token ids (default 2)")
    p.add_argument("--data", metavar="pkg.mod:factory",
                   help="for passes that learn: a function returning the batches (e.g. a DataLoader of (inputs, target) "
                        "pairs or of bare inputs), or a pair (training batches, evaluation batches)")
    p.add_argument("--mode", choices=("train", "eval"),
                   help="capture the model in this mode (default: train for a state dict, as saved for a .pt2)")
    p.add_argument("--static-batch", action="store_true", help="keep the batch size fixed instead of dynamic")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the graphs before/after each pass on the example inputs (faster; no numerics in the report)")
    p.add_argument("--codegen", choices=("auto", "on", "off"), default="auto",
                   help="fuse the regions passes marked into ops running emitted Triton kernels "
                        "(auto: on when CUDA is available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="describe a .pt2, .pt or .safetensors file without running or unpickling it")
    p.add_argument("file", help="the file to describe")
    p.add_argument("--graph", action="store_true", help="for a .pt2: also print its graph, one node a line")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="for a .pt2: print the Triton source emitted for each rewrite op, next to what it computes",
    )
    p.add_argument("--json", action="store_true", help="for a rewritten .pt2: print only its saved report, as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="rewrite a built-in model and print the graph diff and the report")
    p.add_argument("--model", default="vit", choices=sorted(_builtin_models()), help="which built-in model (default vit)")
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC", help="passes to run (default approx_bp)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the example input (default 4)")
    p.add_argument("--out", default="demo_out", help="folder for the .pt2 and report.html (default demo_out)")
    p.set_defaults(func=cmd_demo)
    return parser


def _builtin_models():
    from rewrite.zoo import BUILTIN

    return BUILTIN


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RewriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        from codegen.cache import KernelCacheError as UnusableCache  # raised where a kernel first runs

        if not isinstance(exc, UnusableCache):
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return RewriteError.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a program that stopped reading (| head)
        # Point stdout at devnull so that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
