"""What remat tells the user: the recomputations it made, its figures and memory curves, and,
when no schedule meets the budget, why and what budget would."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rewrite.graph import module_path, op_name
from rewrite.liveness import MemoryModel, liveness_profile
from rewrite.node_kinds import is_random
from rewrite.pass_infra import Change, PassResult, Skip
from rewrite.report import format_bytes

if TYPE_CHECKING:
    from passes.remat.lower import Partition

_CURVE_POINTS = 400


def explain(schedule, plain_peak: int, realized: int | None = None, more_intervals: int | None = None) -> str:
    """Why ``schedule`` is no answer, and what would be: ``realized`` is the peak of the last
    schedule once written out (when that is what was over the budget); ``more_intervals``, the
    ``intervals`` option to suggest, if it can be raised."""
    asked = f"budget {format_bytes(schedule.budget)} ({schedule.budget / max(plain_peak, 1):.2f} of the peak {format_bytes(plain_peak)})"
    if realized is not None:
        return (
            f"the schedules found for the {asked} peak at {format_bytes(realized)} once written out (a multi-output "
            f"op allocates all its outputs at once; the solver counts them one by one): budget=\"{realized}B\" fits "
            "the last of them"
        )
    more = f", or allow more recomputations (intervals={more_intervals})" if more_intervals else ""
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


def training_report(part: Partition, schedule, plain_peak: int, cost_model: str) -> PassResult:
    """The recomputations of a planned training step, the random ops left alone, the figures
    and the memory curves before and after (simulated)."""
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
            "budget_bytes": schedule.budget,
            "simulated_peak_before_bytes": plain_peak,
            "simulated_peak_after_bytes": part.simulated_peak,
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
    result.series = {
        "memory_before": downsample(liveness_profile(model.fx_graph)),
        "memory_after": downsample(liveness_profile(part.joint)),
        "budget": schedule.budget,
    }
    return result


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
    proved, the gap to the proved bound (a fraction of the cost found)."""
    figures = {"solver": f"moccasin {schedule.status}", "solve_time_seconds": schedule.seconds}
    if schedule.status == "feasible" and schedule.objective:
        figures["solver_gap_fraction"] = (schedule.objective - max(schedule.bound or 0.0, 0.0)) / schedule.objective
    return figures


def downsample(values: list[int], points: int = _CURVE_POINTS) -> list[int]:
    """At most ``points`` values keeping every stretch's maximum (the peaks stay visible)."""
    if len(values) <= points:
        return list(values)
    step = len(values) / points
    return [max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(points)]
