"""remat: train (or run) a model in less memory by recomputing tensors instead of keeping them.

The choice of what to keep and what to recompute, and when, is solved over the real liveness
of the step's graph in a fixed order with CP-SAT in the Moccasin formulation
(``solvers.moccasin``): each tensor gets up to ``intervals`` retention intervals, memory
never exceeds the budget in the simulation, and the total cost of the recomputations is the
least found in ``time_limit`` seconds.

- ``graph="training"`` (the default): the joint forward+backward graph AOTAutograd traces
  (``rewrite.training_graph``). The schedule becomes the forward graph, which saves only what
  is kept across the forward/backward boundary, and the backward graph, which recomputes the
  rest just where the schedule says. The rewritten module runs its training calls (grad
  enabled, in train mode) through these graphs; inference calls and ``rewrite.save`` use the
  forward graph, which is unchanged. The schedule is made for the example inputs' shapes;
  a call with other shapes is planned again (with the same options) the first time, and a
  budget no schedule meets for them raises the same ``RematError`` (a ``PassError``) as here.
- ``graph="inference"``: the forward graph alone, for running a model within a memory limit
  (the edge-device case); recomputations become copies of nodes in the graph itself.

What a recomputation costs is the ``cost`` model's (``rewrite.training_graph.COST_MODELS``):
``flops`` (default) prices an op at its FLOPs plus one per byte it moves, so the schedule
recomputes the fewest matmul/convolution FLOPs, pointwise ops before them; ``roofline`` at the
larger of its FLOPs and 10 per byte, nearer its time when ops run one by one as here;
``measured`` times every op of the graph on this machine (a second or so more to plan).

The budget is a fraction of the unmodified step's peak memory of intermediate tensors
(activations, gradients, temporaries; not the parameters or inputs), or an absolute size
("1.5GB", "800MiB"). Exact: outputs and gradients equal the original's up to float rounding
(recomputation repeats the same ops); random ops (dropout) are never recomputed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.errors import PassError
from rewrite.graph import module_path, op_name
from rewrite.pass_infra import Change, Pass, PassContext, PassResult, Skip, option
from rewrite.report import format_bytes
from rewrite.training_graph import (
    DEFAULT_COST,
    MemoryModel,
    Partition,
    ScheduledTraining,
    is_random,
    liveness_profile,
    measure_peak,
    realize,
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_CURVE_POINTS = 400
# Solves again, each with the budget lowered by the excess, when a realized step is over it.
_RETRIES = 2
# The CP-SAT model grows with the square of the intervals per tensor (a 500-node graph: 0.06 s
# and 5k variables to build at 2, 0.8 s and 62k at 8, 13 s, 830k and 1.4 GB at 32).
_MAX_INTERVALS = 8


def parse_size(text: str) -> int:
    """'1.5GB' -> 1500000000, '800MiB' -> 838860800, '4096' -> 4096."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 1.5GB, 800MiB or 4096 (bytes)")
    size = float(m.group(1)) * _UNITS[unit]
    if not 1 <= size < math.inf:
        raise ValueError(f"the size {text!r} must be a finite number of bytes, at least 1")
    return int(size)


def _downsample(values: list[int], points: int = _CURVE_POINTS) -> list[int]:
    """At most ``points`` values keeping every stretch's maximum (the peaks stay visible)."""
    if len(values) <= points:
        return list(values)
    step = len(values) / points
    return [max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(points)]


class RematError(PassError):
    """No schedule: the message says why and what budget would do. Raised when the pass runs
    and when a call with new input shapes is planned again."""

    def __init__(self, message: str):
        super().__init__("remat", message)


@dataclass
class _Planner:
    """Solves one memory model under the pass's budget; remembers what it decided."""

    remat: Remat
    schedules: list = field(default_factory=list)
    resolved: list = field(default_factory=list)  # bytes over the budget of each schedule solved again
    _solved: dict = field(default_factory=dict)  # problem -> schedule: the same step traced again

    def budget_bytes(self, plain_peak: int) -> int:
        budget = self.remat.budget
        if isinstance(budget, str):
            return parse_size(budget)
        return math.floor(budget * plain_peak)

    def __call__(self, model: MemoryModel) -> dict:
        from solvers import moccasin

        plain_peak = max(liveness_profile(model.fx_graph), default=0)
        budget = self.budget_bytes(plain_peak)
        problem = (
            tuple(model.order),
            tuple(sorted(model.graph.edges)),
            # measured costs differ run to run: the same step traced again is known by its ops
            tuple(
                (n, d["mem"], d["cost"] if self.remat.cost != "measured" else None, d["recompute"])
                for n, d in model.graph.nodes(data=True)
            ),
            tuple(str(u.node.target) for u in model.units),
            tuple(sorted(model.keep)),
            budget,
        )
        if problem in self._solved:
            schedule = self._solved[problem]
            self.schedules.append((model, schedule, plain_peak))
            return schedule.intervals
        target, realized = budget, None
        for _ in range(_RETRIES + 1):
            schedule = moccasin.solve(
                model.graph,
                model.order,
                target,
                intervals_per_node=self.remat.intervals,
                time_limit=self.remat.time_limit,
                workers=self.remat.workers or os.cpu_count() or 1,
                keep=model.keep,
            )
            if not schedule.has_schedule:
                break
            # The solver counts each output of a multi-output op from a position of its own;
            # the op allocates them all at once (and a recomputed one all its outputs again):
            # the realized step is what must fit. Short of it, ask again with the excess off.
            realized = max(liveness_profile(realize(model, schedule.intervals)[0]), default=0)
            if realized <= budget:
                break
            self.resolved.append(realized - budget)
            target -= realized - budget
        schedule.budget = budget
        self.schedules.append((model, schedule, plain_peak))
        if not schedule.has_schedule or realized > budget:
            raise RematError(self.explain(schedule, plain_peak, realized if self.resolved else None))
        self._solved[problem] = schedule
        return schedule.intervals

    def explain(self, schedule, plain_peak: int, realized: int | None = None) -> str:
        asked = f"budget {format_bytes(schedule.budget)} ({schedule.budget / max(plain_peak, 1):.2f} of the peak {format_bytes(plain_peak)})"
        if realized is not None:
            return (
                f"the schedules found for the {asked} peak at {format_bytes(realized)} once written out (a multi-output "
                f"op allocates all its outputs at once; the solver counts them one by one): budget=\"{realized}B\" fits "
                "the last of them"
            )
        intervals = self.remat.intervals
        more = f", or allow more recomputations (intervals={intervals + 1})" if intervals < _MAX_INTERVALS else ""
        if schedule.status == "infeasible":
            smallest = schedule.smallest_feasible_budget
            hint = (
                f"; the smallest budget a schedule was found for is {format_bytes(smallest)} "
                f"(budget={smallest / max(plain_peak, 1):.3f}, or budget=\"{smallest}B\")"
                if smallest
                else ""
            )
            return f"no schedule fits the {asked}{hint}: raise the budget{more}"
        return f"no schedule within the {asked} was found in {schedule.seconds:.1f} s: raise time_limit or the budget{more}"


@dataclass(frozen=True)
class Remat(Pass):
    """Rematerialization under a memory budget, solved with CP-SAT (Moccasin)."""

    name: ClassVar[str] = "remat"
    budget: float | str = option(
        0.5,
        "memory budget: a fraction of the unmodified step's peak of intermediate tensors (1: all of it, nothing "
        "recomputed), or a size such as 1.5GB",
        gt=0,
        le=1,
        parse=parse_size,
    )
    # Checkmate's MILP (solvers.checkmate) has O(n^2) variables and no stage-to-interval
    # lowering here: it is the benchmark's baseline, not a solver for this pass.
    solver: Literal["moccasin"] = option("moccasin", "schedule solver: moccasin (CP-SAT, exact given time)")
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
        le=_MAX_INTERVALS,
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
        if "training_step" in getattr(gm, "meta", {}):
            raise self.fail("the graph already has a remat schedule; run remat once, as the last training pass")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.graph == "inference":
            return self._run_inference(gm, ctx)
        return self._run_training(gm, ctx)

    # ------------------------------------------------------------------ training

    def _run_training(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        planner = _Planner(self)
        step = ScheduledTraining(planner, cost=self.cost)
        args, kwargs = ctx.example_args, ctx.example_kwargs
        if not any(p.requires_grad for p in gm.parameters()):
            raise self.fail("the model has no parameter that requires grad: use graph=\"inference\" to run it in less memory")
        params = [p for p in gm.parameters() if p.requires_grad]
        buffers = [(b, b.detach().clone()) for b in gm.buffers()]

        def restore():
            with torch.no_grad():
                for tensor, value in buffers:
                    tensor.copy_(value)

        try:
            part = step.prepare(gm, args, kwargs)  # traces, plans and compiles
        except Exception as exc:
            cause = _root_cause(exc)
            if isinstance(cause, RematError):
                raise cause from None
            raise self.fail(f"could not trace the training step: {type(cause).__name__}: {cause}") from exc
        try:
            measured_after = measure_peak(lambda: _train_step(lambda: step(gm, args, kwargs), params))
            restore()
            measured_before = measure_peak(lambda: _train_step(lambda: gm(*args, **kwargs), params))
        finally:
            restore()
        _, schedule, plain_peak = planner.schedules[-1]
        # Later calls with other shapes are planned again; tell the user when that happens.
        step.on_compile = _stderr_note
        gm.meta["training_step"] = step
        result = self._describe(part, schedule, plain_peak)
        _note_resolved(result, planner)
        result.figures["measured_peak_before"] = format_bytes(measured_before)
        result.figures["measured_peak_after"] = format_bytes(measured_after)
        result.figures["measured_peak_ratio"] = round(measured_after / measured_before, 3) if measured_before else None
        return result

    def _describe(self, part: Partition, schedule, plain_peak: int) -> PassResult:
        model = part.model
        result = PassResult()
        recomputed_flops, recomputed_cost = _list_recomputations(result, model, part.intervals, part.forward_end)
        for node in {u.node: None for u in model.units}:
            if is_random(node):
                result.skipped.append(
                    Skip(node.name, module_path(node), op_name(node), "random op: never recomputed (a new draw would differ)")
                )
        total_flops, total_cost = model.total_flops(), model.total_cost()
        result.figures.update(
            {
                "budget": format_bytes(schedule.budget),
                "simulated_peak_before": format_bytes(plain_peak),
                "simulated_peak_after": format_bytes(part.simulated_peak),
                "solver": _solver_text(schedule),
                "cost_model": self.cost,
                "recompute_cost": f"{schedule.objective:.4g} (bound {schedule.bound:.4g})"
                if schedule.objective is not None
                else "none",
                "recomputed_tensors": len(result.changes),
                "recompute_flops_overhead": f"{recomputed_flops / total_flops:.2%} of the step's matmul/conv FLOPs"
                if total_flops
                else "0",
                "recompute_cost_overhead": f"{recomputed_cost / total_cost:.2%} of the step's estimated cost" if total_cost else "0",
                "saved_for_backward": len(part.saved),
            }
        )
        result.series = {
            "memory_before": _downsample(liveness_profile(model.fx_graph)),
            "memory_after": _downsample(liveness_profile(part.joint)),
            "budget": schedule.budget,
        }
        return result

    # ------------------------------------------------------------------ inference

    def _run_inference(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        model = MemoryModel.from_graph(gm.graph, cost=self.cost)
        planner = _Planner(self)
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
        _note_resolved(result, planner)
        _list_recomputations(result, model, intervals, None)
        result.figures.update(
            {
                "budget": format_bytes(schedule.budget),
                "simulated_peak_before": format_bytes(plain_peak),
                "simulated_peak_after": format_bytes(max(part_curve, default=0)),
                "solver": _solver_text(schedule),
                "cost_model": self.cost,
                "recomputed_tensors": len(result.changes),
                "measured_peak_before": format_bytes(measured_before),
                "measured_peak_after": format_bytes(measured_after),
            }
        )
        result.series = {
            "memory_before": _downsample(liveness_profile(model.fx_graph)),
            "memory_after": _downsample(part_curve),
            "budget": schedule.budget,
        }
        return result


def _list_recomputations(result: PassResult, model: MemoryModel, intervals: dict, forward_end: int | None):
    """One Change per recomputed tensor; returns the FLOPs and the cost the recomputations add
    (the outputs of one op recomputed at one time count once)."""
    nodes = {u.name: u.node for u in model.units}
    flops = cost = 0
    runs = set()
    for name, spans in intervals.items():
        node = nodes[name]
        for start, _ in spans[1:]:
            if (node, start) not in runs:
                runs.add((node, start))
                flops += model.flops.get(node.name, 0)
                cost += model.graph.nodes[name]["cost"]
            phase = "" if forward_end is None else (" in the backward" if start >= forward_end else " in the forward")
            result.changes.append(
                Change(
                    node=name,
                    where=module_path(node),
                    before=op_name(node),
                    after="recomputed",
                    detail=f"{format_bytes(model.graph.nodes[name]['mem'])}, recomputed{phase} before {model.order[start]}",
                )
            )
    return flops, cost


def _note_resolved(result: PassResult, planner: _Planner) -> None:
    if planner.resolved:
        result.figures["solved_again"] = (
            f"{len(planner.resolved)}x: the realized step was over the budget by "
            + ", ".join(format_bytes(b) for b in planner.resolved)
        )


def _solver_text(schedule) -> str:
    """'moccasin optimal, 1.2 s' or, when optimality is not proved, the gap to the bound."""
    text = f"moccasin {schedule.status}, {schedule.seconds:.2f} s"
    if schedule.status == "feasible" and schedule.objective:
        bound = max(schedule.bound or 0.0, 0.0)
        text += f", gap {(schedule.objective - bound) / schedule.objective:.0%} to the proved bound"
    return text


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


def _stderr_note(message: str) -> None:
    import sys

    print(f"[rewrite] {message}", file=sys.stderr, flush=True)
