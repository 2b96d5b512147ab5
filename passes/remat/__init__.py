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

The budget bounds what ``of`` says, at every point of the step (simulated over the graph,
freeing each tensor after its last use; never the parameters or inputs):

- ``of="activations"`` (the default): the activation memory, the intermediate tensors alive
  except the gradients the backward returns (of the parameters and inputs: the joint graph's
  outputs after the forward's), i.e. what is saved for the backward and the temporaries of
  both passes. Recomputation lowers it; it cannot lower the gradients, which at the small
  batches models are fine-tuned at set the whole step's peak (what ``activation_memory_budget``
  and ``torch.utils.checkpoint`` users mean by "half the memory").
- ``of="peak"``: all intermediate tensors, gradients included: the whole step's peak.

For ``graph="inference"`` there are no gradients and the two coincide. A fraction is of the
unmodified step's peak of that quantity; a size ("1.5GB", "800MiB", "4096") is that many
bytes of it. When no schedule fits, ``RematError`` says what sets the floor (the gradients,
the outputs kept to the end, the largest op's working set, with bytes) and the smallest budget
found, as a fraction and as a size that work when passed back; ``closest=True`` plans that
schedule instead and warns (the report's ``budget_met`` is False, ``budget_used_bytes`` its
peak). The report gives both peaks, activation and whole step, before and after.

Exact: outputs and gradients equal the original's up to float rounding (recomputation repeats
the same ops); random ops (dropout) are never recomputed.

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
from passes.remat.plan import AUTO_INTERVALS, MAX_INTERVALS, Planner, RematError, parse_size
from passes.remat.report import budget_figures, list_recomputations, note_resolved, solver_figures, training_report
from rewrite.cost_models import DEFAULT_COST
from rewrite.liveness import MemoryModel
from rewrite.memory import measure_peak
from rewrite.pass_infra import Pass, PassContext, PassResult, option
from rewrite.progress import note
from rewrite.state import buffers_kept
from rewrite.training_step import TRAINING_STEP

__all__ = ["Remat", "RematError", "parse_size"]


@dataclass(frozen=True)
class Remat(Pass):
    """Rematerialization under a memory budget, solved with CP-SAT (Moccasin).

    ``budget`` bounds the activation memory (``of="activations"``, the default: the step's
    intermediate tensors but the gradients it returns) or the whole step's peak
    (``of="peak"``), as a fraction of the unmodified step's or a size; a budget no schedule
    fits is a ``RematError`` naming the floor and a budget that works, or, with
    ``closest=True``, the closest schedule found and a warning. See the module's docstring.
    """

    name: ClassVar[str] = "remat"
    runs_last: ClassVar[str] = "it plans the memory of the training step of the graph it is given, which a later pass would change"
    budget: float | str = option(
        0.5,
        "memory budget, of what the of option says: a fraction of the unmodified step's peak of it (1: all of "
        "it, nothing recomputed), or a size such as 1.5GB",
        gt=0,
        le=1,
        parse=parse_size,
    )
    of: Literal["activations", "peak"] = option(
        "activations",
        "what the budget bounds: activations (the intermediate tensors alive at each point of the step but the "
        "gradients the backward returns, which no recomputation lowers: what is saved for the backward and the "
        "temporaries) or peak (all intermediate tensors, gradients included); the same for graph=inference",
    )
    closest: bool = option(
        False,
        "when no schedule fits the budget, plan the one with the smallest peak found and warn, rather than fail",
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
        0,
        "retention intervals per tensor: at most intervals-1 recomputations each (the solver's model grows with "
        f"the square of it); 0: {', then '.join(map(str, AUTO_INTERVALS))}, each tried when the search found no schedule with the one before, "
        "first the fewest with which the schedule a quick local search at the most finds can be solved (and the next "
        "from that one's proved optimum, the cheaper kept), or the most alone where it finds none",
        ge=0,
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
    cache: bool = option(
        True,
        "keep solved plans on disk ($REWRITE_PLAN_CACHE, else $XDG_CACHE_HOME/rewrite/plans or "
        "~/.cache/rewrite/plans) and reuse one for the same step, budget and options; files are JSON, checked "
        "before use",
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
        _, schedule, _ = planner.schedules[-1]
        # Later calls with other shapes are planned again; tell the user when that happens.
        step.on_compile = note
        gm.meta[TRAINING_STEP] = step
        result = training_report(part, schedule, self.cost, self.of, planner.closest)
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
        _, schedule, _ = planner.schedules[-1]
        with torch.no_grad():
            measured_before = measure_peak(lambda: gm(*ctx.example_args, **ctx.example_kwargs))
        new_graph, _ = realize(model, intervals)
        gm.graph = new_graph
        gm.recompile()
        with torch.no_grad():
            measured_after = measure_peak(lambda: gm(*ctx.example_args, **ctx.example_kwargs))
        result = PassResult()
        note_resolved(result, planner.resolved)
        list_recomputations(result, model, intervals, None)
        result.figures.update(
            {
                # a forward graph returns no gradients: its activation and whole peaks are one
                **budget_figures(result, model.fx_graph, gm.graph, schedule, self.of, planner.closest),
                **solver_figures(schedule),
                "cost_model": self.cost,
                "recomputed_tensors": len(result.changes),
                "measured_peak_before_bytes": measured_before,
                "measured_peak_after_bytes": measured_after,
            }
        )
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

