"""``optimize``: capture a model, run passes over its graph, hand back a drop-in module."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from rewrite.capture import capture, in_mode, model_failure
from rewrite.errors import OptionError
from rewrite.module import RewriteInfo, RewrittenModule, structure_only
from rewrite.pass_infra import Pass, PassContext, resolve_passes
from rewrite.pass_manager import PassManager, check_order
from rewrite.progress import progress_callback
from rewrite.regions import CompileRegions, marked_regions
from rewrite.report import Report
from rewrite.verify import saved_by_model


def optimize(
    model: torch.nn.Module,
    passes: Sequence[str | Pass] | str | Pass,
    example_inputs=None,
    example_kwargs: dict | None = None,
    *,
    mode: str | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    progress: bool | Callable[[str], None] = False,
    codegen: bool | None = None,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
    seed: int = 0,
) -> RewrittenModule:
    """Rewrite ``model`` with ``passes`` and return a module called like it.

    passes:         names (``"approx_bp"``), CLI specs (``"approx_bp{norms=false}"``) or Pass
                    objects (``passes.ApproxBP(norms=False)``), run in order.
    example_inputs: a tensor or tuple of positional inputs the model is called with
                    (``example_kwargs`` for keyword inputs); used to capture the graph and to
                    check each pass's numerics.
    mode:           "train" or "eval": the mode the graph is captured in (default: the
                    model's). The result switches dropout/batch norm with .train()/.eval();
                    where the model's Python branches on self.training so that the other
                    mode's graph differs, the switch raises RewriteError (the report's notes
                    say where): optimize again with the other mode for that.
    dynamic_batch:  keep dim 0 of the inputs dynamic where torch.export can.
    verify:         run before/after graphs on the example inputs after every pass: an exact
                    pass must match to float rounding; an approximate one reports its error;
                    a gradient check that could test nothing of a pass says so. Also measures
                    the activation memory the model itself saves, for the report.
    progress:       True prints progress to stderr; a callable receives each message.
    data:           batches the passes that learn train on (a re-iterable such as a DataLoader
                    of (inputs, target) pairs or of bare inputs; labels are optional: they
                    distil from the original model); a pass that needs data refuses to run
                    without it.
    eval_data:      batches such passes measure their quality on.
    seed:           what the passes draw (initialisations, sampling) is repeatable under it.
    codegen:        fuse the regions passes marked into ops that run Triton kernels emitted
                    for them (see ``rewrite.regions``); default: on when CUDA is available.
                    Without CUDA the fused ops run the regions op by op with PyTorch.

    The model itself is not modified: the result shares its parameters (like torch.compile),
    except those a pass replaced, which are new tensors.
    """
    if not (isinstance(progress, bool) or callable(progress)):
        raise OptionError(f"progress={progress!r}: give True, False or a function that takes each message")
    if codegen is not None and not isinstance(codegen, bool):
        raise OptionError(f"codegen={codegen!r}: give True, False or None (on when CUDA is available)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise OptionError(f"seed={seed!r}: give an integer")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise OptionError(f"example_kwargs must be a dict of keyword inputs, not a {type(example_kwargs).__name__}")
    report_progress = progress_callback(progress)
    resolved = resolve_passes(passes)
    check_order(resolved)
    for p in resolved:
        if p.needs_data and data is None:
            raise OptionError(
                f"pass {p.name!r} learns from data: give optimize(..., data=batches) (the CLI's --data pkg.mod:factory)"
            )
    for name, batches in (("data", data), ("eval_data", eval_data)):
        if batches is not None and (not isinstance(batches, Iterable) or iter(batches) is batches):
            raise OptionError(f"{name} must be re-iterable (a DataLoader, a list of batches), not a one-pass iterator")
    if report_progress:
        report_progress(f"capturing {type(model).__name__}")
    captured = capture(model, example_inputs, example_kwargs, mode=mode, dynamic_batch=dynamic_batch)
    ctx = PassContext(
        captured.example_args,
        captured.example_kwargs,
        captured.mode,
        data=data,
        eval_data=eval_data,
        progress=report_progress or (lambda message: None),
        seed=seed,
    )
    eager_bytes = None
    if verify:  # the graphs' figures come from the check; this one is what the user's model saves
        try:
            with in_mode(model, captured.mode == "train"):
                eager_bytes = saved_by_model(model, captured.example_args, captured.example_kwargs).total_bytes
        except Exception as exc:  # torch.export traced what the model cannot run (e.g. mixed dtypes)
            raise model_failure(model, exc, captured.example_args, captured.example_kwargs) from exc
    final, pass_reports = PassManager(resolved, verify=verify, progress=report_progress).run(
        captured.graph_module, ctx
    )
    if codegen is None:
        codegen = torch.cuda.is_available()
    if codegen and marked_regions(final):
        final, codegen_reports = PassManager([CompileRegions()], verify=verify, progress=report_progress).run(final, ctx)
        pass_reports = pass_reports + codegen_reports
    # The graphs kept for inspection hold meta tensors, not the (pre-rewrite) weights.
    light: dict[int, torch.fx.GraphModule] = {}

    def inspection_copy(gm):
        if id(gm) not in light:
            light[id(gm)] = structure_only(gm)
        return light[id(gm)]

    before = inspection_copy(captured.graph_module)
    model_name = model.rewrite_info.model_name if isinstance(model, RewrittenModule) else type(model).__name__
    report = Report(
        model=model_name,
        mode=captured.mode,
        capture_seconds=captured.seconds,
        dynamic_inputs=captured.dynamic_inputs,
        notes=captured.notes,
        passes=pass_reports,
        eager_activation_bytes=eager_bytes,
        fixed_mode=captured.fixed_mode,
    )
    info = RewriteInfo(
        model_name=model_name,
        mode=captured.mode,
        before=before,
        report=report,
        example_args=captured.example_args,
        example_kwargs=captured.example_kwargs,
        dynamic_shapes=captured.dynamic_shapes,
    )
    rewritten = RewrittenModule(final, info)
    for entry in pass_reports:
        entry.before, entry.after = inspection_copy(entry.before), inspection_copy(entry.after)
    return rewritten
