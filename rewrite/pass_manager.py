"""PassManager: run passes in order on copies of the graph; after each, lint the graph, check
the numerics on the example inputs, keep the graphs before and after, and name the pass
that broke something. The graph it was given is never modified."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch.fx as fx

from rewrite.errors import KernelCacheError, OptionError, PassError, RewriteError
from rewrite.module import clone_graph_module
from rewrite.pass_infra import Pass, PassContext
from rewrite.report import PassReport
from rewrite.verify import Numerics, compare


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        progress: Callable[[str], None] | None = None,
    ):
        self.passes = list(passes)
        check_order(self.passes)
        self.verify = verify
        self.progress = progress or (lambda message: None)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, list[PassReport]]:
        reports = []
        for index, p in enumerate(self.passes, start=1):
            self.progress(f"pass {index}/{len(self.passes)}: {p.spec()}")
            after, report = self._run_one(p, gm, ctx)
            reports.append(report)
            self.progress(
                f"pass {index}/{len(self.passes)}: {p.spec()}: {len(report.changes)} changed, "
                f"{len(report.skipped)} left alone ({report.seconds:.2f} s)"
            )
            gm = after
        return gm, reports

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassReport]:
        start = time.perf_counter()
        work = clone_graph_module(gm)
        try:
            p.check(work, ctx)
            result = p.run(work, ctx)
        except RewriteError:
            raise
        except Exception as exc:
            _raise_if_kernel_cache(exc)
            raise PassError(p.name, f"failed: {type(exc).__name__}: {exc}") from exc
        try:
            work.graph.lint()
            work.recompile()
        except Exception as exc:
            raise PassError(p.name, f"left a broken graph: {exc}") from exc
        missing = [n.name for n in work.graph.nodes if n.op == "call_function" and "val" not in n.meta]
        if missing:
            raise PassError(p.name, f"left nodes without metadata (meta['val']): {', '.join(missing[:5])}")
        p.postcondition(work, ctx, result)
        numerics = self._check_numerics(p, gm, work, ctx) if self.verify else None
        if ctx.eval_data is not None and not p.exact_forward:
            self.progress(f"measuring {p.name} on eval_data")
            result.figures.update(p.evaluate(gm, work, ctx))
        report = PassReport(
            name=p.name,
            spec=p.spec(),
            options=p.options_dict(),
            exact_forward=p.exact_forward,
            exact_backward=p.exact_backward,
            result=result,
            numerics=numerics,
            seconds=time.perf_counter() - start,
            before=gm,
            after=work,
        )
        return work, report

    def _check_numerics(self, p: Pass, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> Numerics:
        self.progress(f"checking {p.name} on the example inputs")
        try:
            numerics = compare(before, after, ctx.example_args, ctx.example_kwargs)
        except Exception as exc:
            _raise_if_kernel_cache(exc)
            raise PassError(p.name, f"the rewritten graph fails on the example inputs: {type(exc).__name__}: {exc}") from exc
        if p.exact_forward and not numerics.forward_within_rounding:
            worst = numerics.worst(numerics.outputs)
            raise PassError(p.name, f"changed the outputs beyond float rounding: {worst.describe()}")
        if p.exact_backward and not numerics.backward_within_rounding:
            worst = numerics.worst(numerics.grads)
            raise PassError(p.name, f"changed the gradients beyond float rounding: {worst.describe()}")
        return numerics


def check_order(passes: Sequence[Pass]) -> None:
    """Refuse an order the passes' own rules forbid, before anything runs."""
    for index, p in enumerate(passes[:-1]):
        if p.runs_last:
            after = ", ".join(q.spec() for q in passes[index + 1 :])
            raise OptionError(f"pass {p.name!r} must run last: {p.runs_last}; move {after} before it")


def _raise_if_kernel_cache(exc: Exception) -> None:
    """An unusable kernel cache directory is not the pass's fault: codegen's message names it."""
    from codegen.cache import KernelCacheError as UnusableDirectory

    if isinstance(exc, UnusableDirectory):
        raise KernelCacheError(exc.message) from exc
