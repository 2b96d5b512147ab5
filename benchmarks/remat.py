"""Rematerialization solvers side by side: Moccasin (CP-SAT) against the Checkmate MILP.

Part (a) of the remat claims. Random layered graphs like the papers' RL benchmarks (layers
of 4-8 nodes; each node reads 1-4 nodes, mostly of the previous layer, sometimes of any
earlier one; sizes and costs random in 1..10), budgets as fractions of the peak memory of the
plain schedule. Two edge densities (``--graphs``): "paper" adds random inputs until the edge
counts are the Moccasin paper's (236 for RL100, 5875 for RL1000; RL250 and RL500 interpolated
linearly in edges per node: 736 and 1961), "sparse" is the generator alone (about 2.3 edges
per node). For each solver: status, the recomputation cost of the best schedule, the proved
bound, the solve time, and for Moccasin when it first had a schedule within the budget and
when it first had its final cost. Aims: a feasible RL1000 schedule within 60 s on a 2-core
machine, and Moccasin >= 10x faster than the MILP at equal cost on RL250.

Both solvers work over the same fixed order; Moccasin allows ``--intervals`` retention
intervals per node (2: at most one recomputation of each node), the MILP any number of
recomputations with memory freed within a stage, so its optimum can be lower.

    python benchmarks/remat.py                       # part (a) then part (b) (see benchmarks/remat_models.py)
    python benchmarks/remat.py --part a              # RL100..RL1000, both densities, budgets 0.9 and 0.8, 60 s
    python benchmarks/remat.py --graphs paper --sizes 100 --time-limit 10
    python benchmarks/remat.py --part speed --budgets 0.8,0.6  # early stopping against 60 s solves: RL graphs, models

Part speed: the aim "a plan within 5% of the 60-second objective in 5 s for graphs up to
1,000 nodes". Each problem is solved twice: for the whole time limit with no early stopping,
then with ``moccasin.solve``'s defaults (gap, stall); cost and time ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from solvers import checkmate, moccasin  # noqa: E402
from solvers.schedule import no_remat_intervals, peak_memory, random_layered_graph, validate  # noqa: E402
from common import machine  # noqa: E402

# Edge counts of the Moccasin paper's RL graphs: RL100 and RL1000 as published, the sizes in
# between interpolated linearly in edges per node.
PAPER_EDGES = {100: 236, 1000: 5875}


def paper_edges(nodes: int) -> int:
    (low, low_edges), (high, high_edges) = sorted(PAPER_EDGES.items())
    per_node = low_edges / low + (high_edges / high - low_edges / low) * (nodes - low) / (high - low)
    return round(per_node * nodes)


def rl_graph(nodes: int, density: str):
    edges = paper_edges(nodes) if density == "paper" else None
    return random_layered_graph(nodes, seed=nodes, width=8, fan_in=4, skip=0.3, edges=edges)


def _fmt(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--graphs", default="paper,sparse",
                        help="edge densities, comma-separated: paper (its edge counts), sparse (the generator alone)")
    parser.add_argument("--sizes", default="100,250,500,1000", help="graph sizes (nodes)")
    parser.add_argument("--budgets", default="0.9,0.8", help="budgets as fractions of the plain schedule's peak")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CP-SAT workers")
    parser.add_argument("--intervals", type=int, default=2, help="Moccasin's retention intervals per node")
    parser.add_argument("--milp-time-limit", type=float, help="seconds per MILP solve (default: --time-limit)")
    parser.add_argument("--milp-max-nodes", type=int, default=250,
                        help="skip the MILP above this size (its model has O(n^2) booleans)")  # fmt: skip


def solver_row(graph, order, fraction: float, args) -> dict:
    """Moccasin and (up to ``--milp-max-nodes``) the MILP at ``fraction`` of the plain peak;
    every schedule is checked against the budget."""
    budget = int(peak_memory(graph, order, no_remat_intervals(graph, order)) * fraction)
    ours = moccasin.solve(graph, order, budget, time_limit=args.time_limit, workers=args.workers,
                          intervals_per_node=args.intervals, find_smallest_budget=False)  # fmt: skip
    if ours.has_schedule:
        validate(graph, order, ours.intervals, budget)
    milp = None
    if graph.number_of_nodes() <= args.milp_max_nodes:
        milp = checkmate.solve(graph, order, budget, time_limit=args.milp_time_limit or args.time_limit)
        if milp.has_schedule:
            assert max(checkmate.stage_memory(graph, order, milp.compute, milp.keep)) <= budget
    speedup = "-"
    if milp is not None and milp.has_schedule and ours.has_schedule:
        # When Moccasin first had a schedule as cheap as the MILP's final one.
        times = [s for s, value in ours.trace if value <= milp.objective + 1e-9]
        speedup = f"{milp.seconds / max(times[0], 1e-3):.1f}x" if times else "not reached"
    elif milp is not None and ours.has_schedule:
        speedup = "MILP none"
    return {"budget": budget, "ours": ours, "milp": milp, "speedup": speedup}


def print_solver_table(args) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"time limit {args.time_limit:.0f} s per solve (MILP {args.milp_time_limit or args.time_limit:.0f} s); "
          f"CP-SAT workers {args.workers}; Moccasin intervals per node {args.intervals}")  # fmt: skip
    print(
        f"{'graph':<22}{'budget':>7}  {'moccasin: status':<17}{'cost':>6}{'bound':>7}{'time s':>8}{'first s':>9}"
        f"{'best s':>8}   {'MILP: status':<14}{'cost':>6}{'time s':>8}   {'speedup at equal cost':>21}"
    )
    for density in args.graphs.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            graph, order = rl_graph(n, density)
            name = f"RL{n} {density} ({graph.number_of_edges()} e)"
            for fraction in (float(f) for f in args.budgets.split(",")):
                row = solver_row(graph, order, fraction, args)
                ours, milp = row["ours"], row["milp"]
                milp_text = (
                    f"{milp.status:<14}{_fmt(milp.objective):>6}{milp.seconds:>8.1f}" if milp is not None
                    else f"{'not run':<14}{'-':>6}{'-':>8}"
                )  # fmt: skip
                print(
                    f"{name:<22}{fraction:>7.2f}  {ours.status:<17}{_fmt(ours.objective):>6}{_fmt(ours.bound):>7}"
                    f"{ours.seconds:>8.1f}{_fmt(ours.seconds_to_first, '.1f'):>9}"
                    f"{_fmt(ours.seconds_to_best, '.1f'):>8}   {milp_text}   {row['speedup']:>21}",
                    flush=True,
                )


# --------------------------------------------------------------------------- part speed


def model_problems(names: list[str], quick: bool) -> list:
    """(name, MemoryModel, solver graph, starts) of each model's training step
    (``benchmarks/remat_models.py``'s models), the budget over its activation memory as the
    pass's default ``of="activations"`` has it."""
    import remat_models

    from passes.remat.hints import training_starts
    from passes.remat.lower import ScheduledTraining
    from rewrite.capture import capture

    found = []
    for name in names:
        case = remat_models.CASES[name](quick)
        case.model.train()
        models = []

        def planner(model):  # the plain step: only the memory model is wanted
            models.append(model)
            return model.plain_intervals()

        gm = capture(case.model, case.inputs, mode="train", dynamic_batch=False).graph_module
        ScheduledTraining(planner).prepare(gm, case.inputs, {})
        model = models[-1]
        found.append((f"{name} ({len(model.order)} units)", model, model.activation_graph(), training_starts(model)))
    return found


def print_speed_table(args) -> None:
    """A plan within 5% of the 60-second objective in 5 s: each problem solved to the time
    limit without early stopping (no gap or stall stop; the local search may use its whole
    share), then with the defaults; the same starts for both on the models."""
    from solvers.schedule import recompute_cost

    print(f"{machine()}; load average {os.getloadavg()[0]:.2f}; CP-SAT workers {args.workers}; intervals {args.intervals}; "
          f"full solve {args.time_limit:.0f} s without early stopping; early: gap {moccasin.GAP:g}, stall "
          f"max({moccasin.STALL_SECONDS:g} s, {moccasin.STALL_SHARE:g} x elapsed), phase one progress "
          f"{moccasin.SEARCH_GAIN:g} of the excess")  # fmt: skip
    print(f"{'problem':<28}{'budget':>7}  {'full: status':<13}{'cost':>12}{'time s':>8}   {'early: status':<14}"
          f"{'stopped':<11}{'start':<24}{'cost':>12}{'time s':>8}   {'cost ratio':>10}{'time ratio':>11}{'full@5s ratio':>14}")  # fmt: skip
    problems = []
    for density in filter(None, args.graphs.split(",")):  # --graphs '': the models alone
        for n in (int(s) for s in args.sizes.split(",")):
            graph, order = rl_graph(n, density)
            problems.append((f"RL{n} {density} ({graph.number_of_edges()} e)", graph, order, set(), {}))
    if args.speed_models:
        for name, model, graph, starts in model_problems(args.speed_models.split(","), args.quick):
            problems.append((name, graph, model.order, model.keep, starts))
    for name, graph, order, keep, starts in problems:
        plain = peak_memory(graph, order, no_remat_intervals(graph, order, keep))
        for fraction in (float(f) for f in args.budgets.split(",")):
            budget = int(plain * fraction)
            common = dict(intervals_per_node=args.intervals, workers=args.workers, keep=keep, starts=starts,
                          find_smallest_budget=False)  # fmt: skip
            full = moccasin.solve(graph, order, budget, time_limit=args.time_limit, gap=0.0, stall_seconds=None, **common)
            early = moccasin.solve(graph, order, budget, time_limit=args.time_limit, **common)
            for result in (full, early):
                if result.has_schedule:
                    validate(graph, order, result.intervals, budget, keep)
                    assert result.objective == recompute_cost(graph, result.intervals)
            ratio = (
                "-" if not (full.has_schedule and early.has_schedule)
                else "1.000" if early.objective == full.objective
                else f"{early.objective / full.objective:.3f}" if full.objective else "inf"
            )  # fmt: skip
            # what the full solve had after 5 s (the aim's time), against its final cost
            at_five = [value for seconds, value in full.trace if seconds <= 5.0]
            five = f"{min(at_five) / full.objective:.3f}" if at_five and full.objective else "-"
            print(f"{name:<28}{fraction:>7.2f}  {full.status:<13}{_fmt(full.objective, '.4g'):>12}{full.seconds:>8.1f}   "
                  f"{early.status:<14}{early.stopped:<11}{early.phase_one[:23]:<24}{_fmt(early.objective, '.4g'):>12}"
                  f"{early.seconds:>8.1f}   {ratio:>10}{early.seconds / max(full.seconds, 1e-9):>11.3f}{five:>14}", flush=True)  # fmt: skip


def main() -> None:
    import remat_models  # part (b), beside this file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "both", "speed"), default="both",
                        help="a: the solvers on RL graphs; b: the pass on real models against min-cut and checkpointing; "
                             "speed: early stopping against the full time limit on RL graphs and the models' steps")
    parser.add_argument("--speed-models", default="mlp,cnn,transformer",
                        help="--part speed: the models of part (b) whose training steps are solved too ('' for none)")  # fmt: skip
    add_solver_arguments(parser)
    remat_models.add_arguments(parser)
    args = parser.parse_args()
    if args.part in ("a", "both"):
        print_solver_table(args)
    if args.part in ("b", "both"):
        remat_models.run(args)
    if args.part == "speed":
        print_speed_table(args)


if __name__ == "__main__":
    main()
