"""``optimize``: capture a model, run passes over its graph, hand back a drop-in module."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch

from rewrite.capture import capture
from rewrite.module import RewriteInfo, RewrittenModule, clone_graph_module
from rewrite.pass_infra import Pass, PassContext, resolve_passes
from rewrite.pass_manager import PassManager
from rewrite.report import Report


def _stderr_progress(message: str) -> None:
    print(f"[rewrite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _model_name(model: torch.nn.Module) -> str:
    """The user's class name, also for a module that was rewritten (or saved and loaded) before."""
    if isinstance(model, RewrittenModule):
        report = model.report
        name = report.get("model") if isinstance(report, dict) else getattr(report, "model", None)
        if name:
            return name
    return type(model).__name__


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
) -> RewrittenModule:
    """Rewrite ``model`` with ``passes`` and return a module called like it.

    passes:         names (``"approx_bp"``), CLI specs (``"approx_bp{norms=false}"``) or Pass
                    objects (``passes.ApproxBP(norms=False)``), run in order.
    example_inputs: a tensor or tuple of positional inputs the model is called with
                    (``example_kwargs`` for keyword inputs); used to capture the graph and to
                    check each pass's numerics.
    mode:           "train" or "eval": the mode the graph is captured in (default: the
                    model's). The result switches dropout/batch norm with .train()/.eval().
    dynamic_batch:  keep dim 0 of the inputs dynamic where torch.export can.
    verify:         run before/after graphs on the example inputs after every pass: an exact
                    pass must match to float rounding; an approximate one reports its error.
    progress:       True prints progress to stderr; a callable receives each message.

    The model itself is not modified: the result shares its parameters (like torch.compile),
    except those a pass replaced, which are new tensors.
    """
    report_progress = _stderr_progress if progress is True else (progress or None)
    resolved = resolve_passes(passes)
    if report_progress:
        report_progress(f"capturing {type(model).__name__}")
    captured = capture(model, example_inputs, example_kwargs, mode=mode, dynamic_batch=dynamic_batch)
    ctx = PassContext(captured.example_args, captured.example_kwargs, captured.mode)
    before = clone_graph_module(captured.graph_module)
    final, pass_reports = PassManager(resolved, verify=verify, progress=report_progress).run(
        captured.graph_module, ctx
    )
    report = Report(
        model=_model_name(model),
        mode=captured.mode,
        capture_seconds=captured.seconds,
        dynamic_inputs=captured.dynamic_inputs,
        notes=captured.notes,
        passes=pass_reports,
    )
    info = RewriteInfo(
        before=before,
        report=report,
        example_args=captured.example_args,
        example_kwargs=captured.example_kwargs,
        dynamic_shapes=captured.dynamic_shapes,
    )
    return RewrittenModule(final, info)
