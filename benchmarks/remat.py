"""Rematerialization solvers side by side: Moccasin (CP-SAT) against the Checkmate MILP.

Part (a) of the remat claims. Random layered graphs like the papers' RL benchmarks (each
node reads 1-4 nodes, mostly of the previous layer, sometimes of any earlier one; sizes and
costs random in 1..10), budgets as fractions of the peak memory of the plain schedule. For
each solver: status, the recomputation cost of the best schedule, the proved bound, the
solve time and (Moccasin, from its solution trace) the time it first reached the MILP's final
objective. Aims: Moccasin >= 10x faster than the MILP at equal objective on RL250, and a
feasible RL1000 schedule within 60 s on a 2-core machine.

Both solvers work over the same fixed order; Moccasin allows ``--intervals`` retention
intervals per node (2: at most one recomputation of each node), the MILP any number of
recomputations with memory freed within a stage, so its optimum can be lower.

    python benchmarks/remat.py                       # RL100..RL1000, budgets 0.9 and 0.8, 60 s each
    python benchmarks/remat.py --sizes 100 --time-limit 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from solvers import checkmate, moccasin  # noqa: E402
from solvers.schedule import no_remat_intervals, peak_memory, random_layered_graph, validate  # noqa: E402


def _fmt(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,250,500,1000", help="graph sizes (nodes)")
    parser.add_argument("--budgets", default="0.9,0.8", help="budgets as fractions of the plain schedule's peak")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CP-SAT workers")
    parser.add_argument("--intervals", type=int, default=2, help="Moccasin's retention intervals per node")
    parser.add_argument("--milp-max-nodes", type=int, default=250,
                        help="skip the MILP above this size (its model has O(n^2) booleans)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"time limit {args.time_limit:.0f} s per solve; CP-SAT workers {args.workers}")  # fmt: skip
    header = (
        f"{'graph':<16}{'budget':>8}  {'moccasin: status':<17}{'cost':>6}{'bound':>7}{'time s':>8}{'to best s':>10}"
        f"   {'MILP: status':<14}{'cost':>6}{'time s':>8}   {'speedup at equal cost':>22}"
    )
    print(header)
    for n in (int(s) for s in args.sizes.split(",")):
        graph, order = random_layered_graph(n, seed=n, width=8, fan_in=4, skip=0.3)
        base = peak_memory(graph, order, no_remat_intervals(graph, order))
        for fraction in (float(f) for f in args.budgets.split(",")):
            budget = int(base * fraction)
            ours = moccasin.solve(graph, order, budget, time_limit=args.time_limit, workers=args.workers,
                                  intervals_per_node=args.intervals, find_smallest_budget=False)  # fmt: skip
            if ours.has_schedule:
                validate(graph, order, ours.intervals, budget)
            milp = None
            if n <= args.milp_max_nodes:
                milp = checkmate.solve(graph, order, budget, time_limit=args.time_limit)
                if milp.has_schedule:
                    assert max(checkmate.stage_memory(graph, order, milp.compute, milp.keep)) <= budget
            speedup = "-"
            if milp is not None and milp.has_schedule and ours.has_schedule:
                # When Moccasin first had a schedule as cheap as the MILP's final one.
                times = [s for s, value in ours.trace if value <= milp.objective + 1e-9]
                if not times and ours.objective <= milp.objective + 1e-9:
                    times = [ours.seconds]
                speedup = f"{milp.seconds / max(times[0], 1e-3):.1f}x" if times else "not reached"
            milp_text = (
                f"{milp.status:<14}{_fmt(milp.objective):>6}{milp.seconds:>8.1f}" if milp is not None
                else f"{'not run':<14}{'-':>6}{'-':>8}"
            )  # fmt: skip
            print(
                f"RL{n} ({graph.number_of_edges()} e){'':<{max(0, 16 - len(f'RL{n} ({graph.number_of_edges()} e)'))}}"
                f"{fraction:>8.2f}  {ours.status:<17}{_fmt(ours.objective):>6}{_fmt(ours.bound):>7}"
                f"{ours.seconds:>8.1f}{_fmt(ours.seconds_to_best, '.1f'):>10}   {milp_text}   {speedup:>22}",
                flush=True,
            )


if __name__ == "__main__":
    main()
