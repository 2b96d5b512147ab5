"""remat: train (or run) a model in less memory by recomputing tensors instead of keeping them.

The choice of what to keep and what to recompute, and when, is solved over the real liveness
of the step's graph in a fixed order with CP-SAT in the Moccasin formulation
(``solvers.moccasin``): each tensor gets up to ``intervals`` retention intervals, memory
never exceeds the budget in the simulation, and the total cost of the recomputations is the
least found in ``time_limit`` seconds.

- ``graph="training"`` (the default): the joint forward+backward graph AOTAutograd traces
  (``rewrite.training_step``). The schedule becomes the forward graph, which saves only what
  is kept across the forward/backward boundary, and the backward graph, which recomputes the
  rest just where the schedule says. The rewritten module runs its training calls (grad
  enabled, in train mode) through these graphs; inference calls and ``rewrite.save`` use the
  forward graph, which is unchanged. The schedule is made for the example inputs' shapes;
  a call with other shapes is planned again (with the same options) the first time, and a
  budget no schedule meets for them raises the same ``RematError`` (a ``PassError``) as here.
- ``graph="inference"``: the forward graph alone, for running a model within a memory limit
  (the edge-device case); recomputations become copies of nodes in the graph itself.

What a recomputation costs is the ``cost`` model's (``rewrite.cost_models.COST_MODELS``):
``flops`` (default) prices an op at its FLOPs plus one per byte it moves, so the schedule
recomputes the fewest matmul/convolution FLOPs, pointwise ops before them; ``roofline`` at the
larger of its FLOPs and 10 per byte, nearer its time when ops run one by one as here;
``measured`` times every op of the graph on this machine (a second or so more to plan).

The budget is a fraction of the unmodified step's peak memory of intermediate tensors
(activations, gradients, temporaries; not the parameters or inputs), or an absolute size
("1.5GB", "800MiB"). Exact: outputs and gradients equal the original's up to float rounding
(recomputation repeats the same ops); random ops (dropout) are never recomputed.

The pass reads top to bottom here; ``plan`` holds the planner (budget, solving, solving
again), ``lower`` the schedule written out as graphs and the training step split on it,
``report`` what the pass reports and explains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from passes.remat.lower import ScheduledTraining, realize
from passes.remat.plan import MAX_INTERVALS, Planner, RematError, parse_size
from passes.remat.report import downsample, list_recomputations, note_resolved, solver_figures, training_report
from rewrite.cost_models import DEFAULT_COST
from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.memory import measure_peak
from rewrite.pass_infra import Pass, PassContext, PassResult, option
from rewrite.progress import note
from rewrite.state import buffers_kept
from rewrite.training_step import TRAINING_STEP

__all__ = ["Remat", "RematError", "parse_size"]


@dataclass(frozen=True)
class Remat(Pass):
    """Rematerialization under a memory budget, solved with CP-SAT (Moccasin)."""

    name: ClassVar[str] = "remat"
    runs_last: ClassVar[str] = "it plans the memory of the training step of the graph it is given, which a later pass would change"
    budget: float | str = option(
        0.5,
        "memory budget: a fraction of the unmodified step's peak of intermediate tensors (1: all of it, nothing "
        "recomputed), or a size such as 1.5GB",
        gt=0,
        le=1,
        parse=parse_size,
    )
    time_limit: float = option(
        60.0,
        "seconds the solver may take per schedule (per solve: one solved again takes as long again; optimize "
        "waits for up to three, so an hour at most)",
        gt=0,
        le=3600,
    )
    graph: Literal["training", "inference"] = option("training", "training (forward+backward step) or inference (forward only)")
    intervals: int = option(
        2,
        "retention intervals per tensor: at most intervals-1 recomputations each (the solver's model grows with "
        "the square of it)",
        ge=1,
        le=MAX_INTERVALS,
    )
    workers: int = option(
        0, "solver threads (0: one per CPU core; CP-SAT gains little past 64, each holding its own search)", ge=0, le=64
    )
    cost: Literal["flops", "roofline", "measured"] = option(
        DEFAULT_COST,
        "what a recomputation costs: flops (FLOPs plus one per byte moved: fewest recomputed matmul/conv FLOPs), "
        "roofline (the larger of FLOPs and 10 per byte: nearer time when ops run one by one) or measured (each op "
        "timed on this machine)",
    )

    def check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if TRAINING_STEP in getattr(gm, "meta", {}):
            raise self.fail("the graph already has a remat schedule; run remat once, as the last training pass")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.graph == "inference":
            return self._run_inference(gm, ctx)
        return self._run_training(gm, ctx)

    # ------------------------------------------------------------------ training

    def _run_training(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        planner = Planner(self)
        step = ScheduledTraining(planner, cost=self.cost)
        args, kwargs = ctx.example_args, ctx.example_kwargs
        if not any(p.requires_grad for p in gm.parameters()):
            raise self.fail("the model has no parameter that requires grad: use graph=\"inference\" to run it in less memory")
        params = [p for p in gm.parameters() if p.requires_grad]
        try:
            part = step.prepare(gm, args, kwargs)  # traces, plans and compiles
        except Exception as exc:
            cause = _root_cause(exc)
            if isinstance(cause, RematError):
                raise cause from None
            raise self.fail(f"could not trace the training step: {type(cause).__name__}: {cause}") from exc
        with buffers_kept(gm):  # each measured step updates batch-norm statistics
            measured_after = measure_peak(lambda: _train_step(lambda: step(gm, args, kwargs), params))
        with buffers_kept(gm):
            measured_before = measure_peak(lambda: _train_step(lambda: gm(*args, **kwargs), params))
        _, schedule, plain_peak = planner.schedules[-1]
        # Later calls with other shapes are planned again; tell the user when that happens.
        step.on_compile = note
        gm.meta[TRAINING_STEP] = step
        result = training_report(part, schedule, plain_peak, self.cost)
        note_resolved(result, planner.resolved)
        result.figures["measured_peak_before_bytes"] = measured_before
        result.figures["measured_peak_after_bytes"] = measured_after
        result.figures["measured_peak_ratio"] = measured_after / measured_before if measured_before else None
        return result

    # ------------------------------------------------------------------ inference

    def _run_inference(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        model = MemoryModel.from_graph(gm.graph, cost=self.cost)
        planner = Planner(self)
        intervals = planner(model)
        _, schedule, plain_peak = planner.schedules[-1]
        with torch.no_grad():
            measured_before = measure_peak(lambda: gm(*ctx.example_args, **ctx.example_kwargs))
        new_graph, _ = realize(model, intervals)
        gm.graph = new_graph
        gm.recompile()
        with torch.no_grad():
            measured_after = measure_peak(lambda: gm(*ctx.example_args, **ctx.example_kwargs))
        part_curve = liveness_profile(gm.graph)
        result = PassResult()
        note_resolved(result, planner.resolved)
        list_recomputations(result, model, intervals, None)
        result.figures.update(
            {
                "budget_bytes": schedule.budget,
                "simulated_peak_before_bytes": plain_peak,
                "simulated_peak_after_bytes": max(part_curve, default=0),
                **solver_figures(schedule),
                "cost_model": self.cost,
                "recomputed_tensors": len(result.changes),
                "measured_peak_before_bytes": measured_before,
                "measured_peak_after_bytes": measured_after,
            }
        )
        result.series = {
            "memory_before": downsample(liveness_profile(model.fx_graph)),
            "memory_after": downsample(part_curve),
            "budget": schedule.budget,
        }
        return result


def _train_step(forward, params: list[torch.Tensor]) -> None:
    """One forward and backward of sum(outputs), gradients returned rather than accumulated
    into ``.grad`` (measuring must not touch the user's model)."""
    out = forward()
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors:
        loss = sum(t.sum() for t in tensors)
        torch.autograd.grad(loss, params, allow_unused=True)


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or (seen.__context__ is not None and not seen.__suppress_context__):
        if isinstance(seen, RematError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return seen

