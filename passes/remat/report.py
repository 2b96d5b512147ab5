"""What remat tells the user: the recomputations it made, its figures and memory curves, and,
when no schedule meets the budget, why and what budget would."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rewrite.graph import module_path, op_name
from rewrite.liveness import MemoryModel, activation_profile, liveness_profile
from rewrite.node_kinds import is_random
from rewrite.pass_infra import Change, PassResult, Skip
from rewrite.report import format_bytes

if TYPE_CHECKING:
    import torch.fx as fx

    from passes.remat.lower import Partition

_CURVE_POINTS = 400


def explain(
    schedule,
    plain_peak: int,
    realized: int | None = None,
    more_intervals: int | None = None,
    *,
    model: MemoryModel | None = None,
    of: str = "peak",
    fits: int | None = None,
) -> str:
    """Why ``schedule`` is no answer, and what would be: ``realized`` is the peak of the last
    schedule once written out (when that is what was over the budget); ``more_intervals``, the
    ``intervals`` option to suggest, if it can be raised; ``model``, the step's memory model,
    to say what sets the floor no schedule goes below; ``of``, what the budget counts
    ("activations" or "peak": the ``of`` option) and ``plain_peak`` is the peak of; ``fits``,
    the peak once written out of a schedule solved at the smallest budget the solver found
    (the solver counts the outputs of a multi-output op one by one: it may be more)."""
    what = "the step's peak" if of == "peak" else "the peak activation memory"
    asked = f"budget {format_bytes(schedule.budget)} ({schedule.budget / max(plain_peak, 1):.2f} of {what} {format_bytes(plain_peak)})"
    if realized is not None:
        return (
            f"the schedules found for the {asked} peak at {format_bytes(realized)} once written out (a multi-output "
            f"op allocates all its outputs at once; the solver counts them one by one): budget=\"{realized}B\" fits "
            "the last of them"
        )
    more = f", or allow more recomputations (intervals={more_intervals})" if more_intervals else ""
    smallest = max(schedule.smallest_feasible_budget or 0, fits or 0)
    hint = (
        f"; the smallest budget a schedule was found for is {format_bytes(smallest)} ({suggested_budget(smallest, plain_peak)})"
        if smallest
        else ""
    )
    if schedule.status == "infeasible":
        floor = f"; {budget_floor(model, of)}" if model is not None else ""
        return f"no schedule fits the {asked}{floor}{hint}: raise the budget{more}"
    if schedule.stopped == "stalled":  # the stall rule, not the time limit, ended the search: more time would not help
        return (
            f"no schedule within the {asked} was found: the search stopped closing in on it after "
            f"{schedule.seconds:.1f} s{hint}; raise the budget{more}, or take the closest schedule found (closest=True)"
        )
    return f"no schedule within the {asked} was found in {schedule.seconds:.1f} s: raise time_limit or the budget{more}"


def suggested_budget(smallest: int, plain_peak: int) -> str:
    """``smallest`` bytes as options that give a budget of at least that much when passed back
    verbatim: the fraction of ``plain_peak`` rounded up to three decimals (the budget in bytes
    is the fraction times the peak, rounded down), and the size. ``budget="123B"`` reads in
    Python and in a ``-p`` spec alike (the spec parser takes a quoted value)."""
    size = f'budget="{smallest}B"'
    thousandths = math.ceil(smallest * 1000 / max(plain_peak, 1))
    while thousandths <= 1000 and math.floor(float(f"{thousandths / 1000:.3f}") * plain_peak) < smallest:
        thousandths += 1
    if thousandths > 1000:
        return size  # more than the unmodified step's peak: only as a size
    return f"budget={thousandths / 1000:.3f}, or {size}"


def budget_floor(model: MemoryModel, of: str) -> str:
    """What sets the least memory any schedule needs, with bytes: under ``of="peak"`` the
    gradients the backward returns (all alive at its end), the other outputs kept to the end,
    and the largest working set of one op (its output and its inputs at once)."""
    from solvers.moccasin import lower_bound_budget

    gradients = model.gradient_units()
    graph = model.activation_graph() if of == "activations" else model.graph
    floor = lower_bound_budget(graph, model.order, model.keep)
    gradient_bytes = sum(model.graph.nodes[v]["mem"] for v in gradients)
    outputs = sum(graph.nodes[v]["mem"] for v in model.keep - gradients)
    parts = []
    if of == "peak" and gradient_bytes:
        parts.append(f"the gradients the backward returns (of the parameters and inputs), alive together at its end, {_bytes(gradient_bytes)}")
    if outputs:
        parts.append(f"the outputs kept to the end, {_bytes(outputs)}")
    working = {v: graph.nodes[v]["mem"] + sum(graph.nodes[u]["mem"] for u in graph.predecessors(v)) for v in model.order}
    if working:
        largest = max(working, key=working.get)
        node = next(u.node for u in model.units if u.name == largest)
        where = f" in {module_path(node)}" if module_path(node) else ""
        if not where and module_path(node, backward=True):
            where = f" in the backward of {module_path(node, backward=True)}"
        parts.append(
            f"the largest working set of one op (its output and its inputs at once), {_bytes(working[largest])}: "
            f"{largest} ({op_name(node)}{where})"
        )
    text = f"no schedule needs less than {_bytes(floor)}, what no recomputation lowers: " + "; ".join(parts)
    if of == "peak" and gradient_bytes:
        text += '; of="activations" (the default) bounds the activation memory alone, leaving out the gradients'
    elif gradient_bytes:
        text += f' (of="activations": the gradients, {_bytes(gradient_bytes)}, are not counted)'
    return text


def _bytes(n: int) -> str:
    return f"{format_bytes(n)} ({n} B)"


def training_report(part: Partition, schedule, cost_model: str, of: str, closest: list = ()) -> PassResult:
    """The recomputations of a planned training step, the random ops left alone, the figures
    and the memory curves before and after (simulated); ``of`` and ``closest`` as in
    ``budget_figures``."""
    model = part.model
    result = PassResult()
    recomputed_flops, recomputed_cost = list_recomputations(result, model, part.intervals, part.forward_end)
    for node in {u.node: None for u in model.units}:
        if is_random(node):
            result.skipped.append(
                Skip(node.name, module_path(node), op_name(node), "random op: never recomputed (a new draw would differ)")
            )
    total_flops, total_cost = model.total_flops(), model.total_cost()
    result.figures.update(
        {
            **budget_figures(result, model.fx_graph, part.joint, schedule, of, closest),
            **solver_figures(schedule),
            "cost_model": cost_model,
            "recompute_cost": schedule.objective,
            "recompute_cost_bound": schedule.bound,
            "recomputed_tensors": len(result.changes),
            # of the step's matmul/conv FLOPs, and of its estimated cost
            "recompute_flops_overhead_fraction": recomputed_flops / total_flops if total_flops else 0.0,
            "recompute_cost_overhead_fraction": recomputed_cost / total_cost if total_cost else 0.0,
            "saved_for_backward": len(part.saved),
        }
    )
    return result


def budget_figures(result: PassResult, before: fx.Graph, after: fx.Graph, schedule, of: str, closest: list = ()) -> dict:
    """The budget and the simulated peaks of the step ``before`` and ``after`` remat, of
    activation memory (the gradients the backward returns left out: what ``of="activations"``
    bounds) and of the whole step (what ``of="peak"`` bounds), with their curves in
    ``result.series``. ``closest``: the planner's (schedule, budget asked, peak reached) of
    the schedules taken over the budget (``closest=True``); for one of them, the budget asked
    is reported, ``budget_met`` is False and ``budget_used_bytes`` the peak it reaches."""
    curves = {
        "memory_before": liveness_profile(before),
        "memory_after": liveness_profile(after),
        "activation_memory_before": activation_profile(before),
        "activation_memory_after": activation_profile(after),
    }
    taken = next(((asked, reached) for s, asked, reached in closest if s is schedule), None)
    budget = schedule.budget if taken is None else taken[0]
    result.series = {name: downsample(curve) for name, curve in curves.items()}
    result.series.update({"budget": budget, "budget_of": of})
    figures = {
        "budget_of": of,
        "budget_bytes": budget,
        "budget_met": taken is None,
        "activation_peak_before_bytes": max(curves["activation_memory_before"], default=0),
        "activation_peak_after_bytes": max(curves["activation_memory_after"], default=0),
        "simulated_peak_before_bytes": max(curves["memory_before"], default=0),
        "simulated_peak_after_bytes": max(curves["memory_after"], default=0),
    }
    if taken is not None:
        figures["budget_used_bytes"] = taken[1]
    return figures


def list_recomputations(result: PassResult, model: MemoryModel, intervals: dict, forward_end: int | None):
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


def note_resolved(result: PassResult, resolved: list[int]) -> None:
    """The schedules solved again, each by how much its realized step was over the budget."""
    if resolved:
        result.figures["solved_again"] = len(resolved)
        result.figures["realized_over_budget_bytes"] = list(resolved)


def solver_figures(schedule) -> dict:
    """The solver's status ('optimal', 'feasible', ...), its time and, when optimality is not
    proved, the gap to the proved bound (a fraction of the cost found); why it stopped
    ('optimal', 'gap', 'stalled', 'time_limit', 'infeasible'), the schedule its search began
    from ('plain', 'local search', 'cp-sat', 'min-cut <setting>', 'checkpoint every block')
    and its cost, whether the plan came from the cache ('hit', 'miss', 'off'), and the
    retention intervals per tensor it was solved with."""
    figures = {"solver": f"moccasin {schedule.status}", "solve_time_seconds": schedule.seconds}
    if schedule.status == "feasible" and schedule.objective:
        figures["solver_gap_fraction"] = (schedule.objective - max(schedule.bound or 0.0, 0.0)) / schedule.objective
    if schedule.stopped:
        figures["solver_stopped"] = schedule.stopped
    if schedule.phase_one:
        figures["solver_start"] = schedule.phase_one
    if schedule.phase_one in schedule.start_costs:
        figures["solver_start_cost"] = schedule.start_costs[schedule.phase_one]
    if schedule.plan_cache:
        figures["plan_cache"] = schedule.plan_cache
    if schedule.intervals_per_node:
        figures["intervals"] = schedule.intervals_per_node  # the setting that found it (intervals=0 tries several)
    return figures


def downsample(values: list[int], points: int = _CURVE_POINTS) -> list[int]:
    """At most ``points`` values keeping every stretch's maximum (the peaks stay visible)."""
    if len(values) <= points:
        return list(values)
    step = len(values) / points
    return [max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(points)]
