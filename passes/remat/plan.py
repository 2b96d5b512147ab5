"""remat's planning: the budget in bytes, and a schedule that meets it once written out.

``Planner`` solves one ``rewrite.liveness.MemoryModel`` with CP-SAT in the Moccasin
formulation (``solvers.moccasin``) and checks the schedule on the graph ``realize`` writes
(``passes.remat.lower``); when that step is over the budget it solves again with the excess
off the budget. The memory counted is what the ``of`` option says: the activation memory
(the gradients the step returns count nothing) or the whole step's. No schedule raises
``RematError`` with what sets the floor and what budget would do, or, with ``closest``, takes
the closest schedule found and warns.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from passes.remat.lower import realize
from passes.remat.report import explain
from rewrite.errors import PassError
from rewrite.liveness import MemoryModel, activation_profile, liveness_profile
from rewrite.report import format_bytes

if TYPE_CHECKING:
    from passes.remat import Remat

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
# Solves again, each with the budget lowered by the excess, when a realized step is over it.
_RETRIES = 2
# The CP-SAT model grows with the square of the intervals per tensor (a 500-node graph: 0.06 s
# and 5k variables to build at 2, 0.8 s and 62k at 8, 13 s, 830k and 1.4 GB at 32).
MAX_INTERVALS = 8
# intervals=0 tries these in turn, the next when the search found no schedule with one (not
# when the budget is below what any schedule needs). More intervals make a budget easier to
# meet (HF Llama with eager attention at half its activation memory: no schedule found at 2
# within the stall rule, one in 0.1 s of local search at 3) and the model larger.
AUTO_INTERVALS = (2, 3, 4)
_PROBE_SECONDS = 3.0  # the most the local search may take to decide the order
# ... and how long its kicks may go on without closing in on the budget (solvers.moccasin's
# SEARCH_GAIN): a setting it cannot meet the budget with is given up in about a second
_PROBE_STALL_SECONDS = 0.5
# ``_one_more``'s solve starts from a proved optimum with fewer intervals: it stops sooner
# when that is not bettered (solvers.moccasin's stall rule, this in place of STALL_SECONDS)
_ONE_MORE_STALL_SECONDS = 1.0
# ``_fallback`` solves at the smallest budget found to check it written out; where the plan is
# only checked (closest=False), not taken, its solve may take this long at most (it begins
# from the schedule found there, so it has one at once; a two-layer Qwen2's went on lowering
# its cost for 10 s)
_CHECK_SECONDS = 3.0


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


class RematError(PassError):
    """No schedule: the message says why and what budget would do. Raised when the pass runs
    and when a call with new input shapes is planned again."""

    def __init__(self, message: str):
        super().__init__("remat", message)


def _auto_order(graph, model: MemoryModel, budget: int) -> tuple[tuple[int, ...], dict | None, bool]:
    """``AUTO_INTERVALS`` in the order to try them, first the fewest with which the local
    search's schedule within ``budget`` can be solved, so that a setting with which only
    CP-SAT's slower phase one could find a schedule is not tried first. The search runs once,
    at the most intervals: they allow every schedule fewer do, and the search at fewer found
    the same or dearer schedules on the tests' Hugging Face models (T5: 5.46M FLOPs at 2
    intervals, 2.83M at 3, 2.67M at 4, using at most 3) in three times the time. Its
    descents first, then, when none fits, its kicks (about a second when they find nothing).
    As they are when the plain step fits. Where the kicks found nothing, the most intervals
    alone: a budget none meets fails once, not once per setting. With the schedule found
    (or None) and whether the kicks found nothing (the solve need not kick again)."""
    from solvers.moccasin import greedy_schedule, usable_start
    from solvers.schedule import no_remat_intervals, peak_memory

    if peak_memory(graph, model.order, no_remat_intervals(graph, model.order, model.keep)) <= budget:
        return AUTO_INTERVALS, None, False
    most = max(AUTO_INTERVALS)
    # not polished: the solve polishes it while CP-SAT improves on it (``moccasin.solve``)
    # one search: its kicks go on from its descents' closest (searching again without kicks
    # first repeated the same descents: T5's probe took twice as long)
    schedule = greedy_schedule(graph, model.order, budget, most, model.keep, time_limit=_PROBE_SECONDS,
                               stall_seconds=_PROBE_STALL_SECONDS, polish=False)  # fmt: skip
    if schedule is None:
        return (most,), None, True
    first = min(i for i in AUTO_INTERVALS if usable_start(graph, model.order, schedule, budget, i, model.keep))
    return (first, *(i for i in AUTO_INTERVALS if i != first)), schedule, False


@dataclass
class Planner:
    """Solves one memory model under the pass's budget; remembers what it decided."""

    remat: Remat
    schedules: list = field(default_factory=list)
    resolved: list = field(default_factory=list)  # bytes over the budget of each schedule solved again
    _solved: dict = field(default_factory=dict)  # problem -> schedule: the same step traced again
    # (schedule, budget asked, peak it reaches) of each schedule taken over the budget (``closest``)
    closest: list = field(default_factory=list)
    # (schedule, its peak once written out) of the last schedule the last solve found, if any
    last_found: tuple | None = None
    # min-cut's and checkpointing's schedules for the model being planned (None: not computed yet)
    _starts: dict | None = None
    # (name, schedule) the first solve begins from where no probe ran (``_fallback``'s)
    given: tuple | None = None

    @property
    def _measure(self):
        """The memory profile the budget bounds: activations (the gradients left out) or all."""
        return activation_profile if self.remat.of == "activations" else liveness_profile

    def budget_bytes(self, plain_peak: int) -> int:
        budget = self.remat.budget
        if isinstance(budget, str):
            return parse_size(budget)
        return math.floor(budget * plain_peak)

    def __call__(self, model: MemoryModel) -> dict:
        # of="activations": the gradients the backward returns count nothing, in the solver's
        # graph and in the realized step; no recomputation lowers them
        activations = self.remat.of == "activations"
        graph = model.activation_graph() if activations else model.graph
        measure = self._measure
        plain_peak = max(measure(model.fx_graph), default=0)
        budget = self.budget_bytes(plain_peak)
        problem = (
            tuple(model.order),
            tuple(sorted(graph.edges)),
            # measured costs differ run to run: the same step traced again is known by its ops
            tuple(
                (n, d["mem"], d["cost"] if self.remat.cost != "measured" else None, d["recompute"])
                for n, d in graph.nodes(data=True)
            ),
            tuple(str(u.node.target) for u in model.units),
            tuple(sorted(model.keep)),
            budget,
        )
        if problem in self._solved:
            schedule = self._solved[problem]
            self.schedules.append((model, schedule, plain_peak))
            return schedule.intervals
        from solvers.moccasin import lower_bound_budget

        below_floor = budget < lower_bound_budget(graph, model.order, model.keep)  # no schedule, whatever the intervals
        self._starts, probe, kicked = None, None, False
        if self.remat.intervals:
            settings = (self.remat.intervals,)
        elif below_floor:  # one solve says so (and finds the smallest budget), at the fewest
            settings = AUTO_INTERVALS[:1]
        elif (stored := self._stored_setting(graph, model, budget)) is not None:
            settings = (stored, *(i for i in AUTO_INTERVALS if i != stored))  # planned before: no probe
        else:
            settings, probe, kicked = _auto_order(graph, model, budget)
        start = "local search"
        if probe is None and self.given is not None:
            start, probe = self.given
        for intervals in settings:
            target, realized = budget, None
            self.last_found = None
            for attempt in range(_RETRIES + 1):
                # the probe searched at this budget: its schedule starts the first setting's solve,
                # its kicks are not repeated
                first = attempt == 0 and intervals == settings[0]
                schedule = self._solve(graph, model, target, intervals, probe if first else None, kicked and first,
                                       start)  # fmt: skip
                if not schedule.has_schedule:
                    break
                # The solver counts each output of a multi-output op from a position of its own;
                # the op allocates them all at once (and a recomputed one all its outputs again):
                # the realized step is what must fit. Short of it, ask again with the excess off.
                realized = max(measure(realize(model, schedule.intervals)[0]), default=0)
                self.last_found = schedule, realized
                if realized <= budget:
                    break
                self.resolved.append(realized - budget)
                target -= realized - budget
            schedule.intervals_per_node = intervals
            if (schedule.has_schedule and realized <= budget) or below_floor:
                break
        if not self.remat.intervals and not below_floor and schedule.has_schedule and realized <= budget:
            schedule, realized = self._one_more(graph, model, budget, schedule, realized)
        schedule.budget = budget
        self.schedules.append((model, schedule, plain_peak))
        if not schedule.has_schedule or realized > budget:
            more = intervals + 1 if intervals < MAX_INTERVALS and not below_floor else None
            fallback = self._fallback(model, schedule)
            why = explain(
                schedule,
                plain_peak,
                realized if self.resolved else None,
                more,
                model=model,
                of=self.remat.of,
                fits=fallback[1] if fallback else None,
            )
            if not self.remat.closest:
                raise RematError(why)
            if fallback is None:
                raise RematError(f"{why} (closest=True: no schedule was found to take instead)")
            closest, reached = fallback
            self.closest.append((closest, budget, reached))
            self.schedules.append((model, closest, plain_peak))
            warnings.warn(
                f"remat: {why}. closest=True: planned the closest schedule found instead, which peaks at "
                f"{format_bytes(reached)} ({reached} B) of {'activation memory' if activations else 'the step'}",
                stacklevel=2,
            )
            return closest.intervals
        self._solved[problem] = schedule
        return schedule.intervals

    def _one_more(self, graph, model: MemoryModel, budget: int, schedule, realized: int) -> tuple:
        """(schedule, its peak written out): ``schedule``, or where the solver proved it the
        cheapest with its intervals per tensor, one solved from it with the next setting of
        ``AUTO_INTERVALS`` when that is cheaper and fits written out. The probe's schedule
        picks the fewest intervals that can start from it; where they bind, one recomputation
        more of a tensor may be cheaper (ViT-style at 0.5 of its activations: a proved optimum
        of +13.4% FLOPs at 2, +12.0% at 3). Not from the plan cache: that holds the better."""
        more = [i for i in AUTO_INTERVALS if i > schedule.intervals_per_node]
        if schedule.status != "optimal" or schedule.plan_cache == "hit" or not more:
            return schedule, realized
        again = self._solve(graph, model, budget, more[0], schedule.intervals, searched=True,
                            start=f"cp-sat at {schedule.intervals_per_node} intervals",
                            stall_seconds=_ONE_MORE_STALL_SECONDS)  # fmt: skip
        if not again.has_schedule or again.objective >= schedule.objective:
            return schedule, realized
        peak = max(self._measure(realize(model, again.intervals)[0]), default=0)
        if peak > budget:
            return schedule, realized
        again.intervals_per_node, again.seconds = more[0], again.seconds + schedule.seconds
        return again, peak

    def _stored_setting(self, graph, model: MemoryModel, budget: int) -> int | None:
        """The most of ``AUTO_INTERVALS`` the plan cache holds a plan for at ``budget``, if the
        cache is on (a plan is stored at more intervals only where fewer found none, or
        ``_one_more`` found one at least as cheap)."""
        if not self.remat.cache:
            return None
        from passes.remat import cache

        return next(
            (i for i in reversed(AUTO_INTERVALS)
             if cache.has(cache.problem_key(graph, model, budget, i, self.remat.cost))),  # fmt: skip
            None,
        )

    def _solve(self, graph, model: MemoryModel, target: int, intervals: int, probe: dict | None = None,
               searched: bool = False, start: str = "local search", stall_seconds: float | None = None):  # fmt: skip
        """``moccasin.solve`` at ``target`` bytes through the plan cache (the ``cache`` option),
        started from min-cut's and checkpointing's schedules where they fit
        (``passes.remat.hints``; computed once per model, on the first miss, and only when the
        plain step does not fit; with a ``probe``, while CP-SAT solves from it: the solve's
        ``late_starts``) and from ``probe`` (the local search's schedule when
        ``_auto_order`` found one, or another named ``start``; ``searched``: the search ran
        at this budget; ``stall_seconds``: the stall rule's, in place of the solver's default)."""
        from passes.remat import cache, hints
        from solvers import moccasin
        from solvers.schedule import no_remat_intervals, peak_memory

        key = None
        if self.remat.cache:
            key = cache.problem_key(graph, model, target, intervals, self.remat.cost)
            cached = cache.load(key, graph, model, target, intervals, self.remat.time_limit)
            if cached is not None:
                return cached
        late = None
        if self._starts is None:
            plain_fits = peak_memory(graph, model.order, no_remat_intervals(graph, model.order, model.keep)) <= target

            def make_starts():
                self._starts = hints.training_starts(model, fits=lambda spans: peak_memory(graph, model.order, spans) <= target)
                return self._starts

            if plain_fits:
                self._starts = {}
            elif probe is None:  # the solve may need them to begin
                make_starts()
            else:
                late = make_starts
        schedule = moccasin.solve(
            graph,
            model.order,
            target,
            intervals_per_node=intervals,
            time_limit=self.remat.time_limit,
            workers=self.remat.workers or os.cpu_count() or 1,
            keep=model.keep,
            starts=({start: probe} if probe is not None else {}) | (self._starts or {}),
            search_kicks=not searched,
            local_search=probe is None,  # the probe's descents are the search's: not run twice
            # with the probe's schedule to begin from, min-cut partitions while CP-SAT solves
            late_starts=late,
            polish_start="local search",  # the probe's: polished beside CP-SAT, like the solve's own search's
            **({} if stall_seconds is None else {"stall_seconds": stall_seconds}),
        )
        schedule.plan_cache = "off" if key is None else "miss"
        if key is not None and schedule.has_schedule:
            cache.store(key, schedule, self.remat.time_limit)
        return schedule

    def _fallback(self, model: MemoryModel, schedule) -> tuple | None:
        """The schedule closest to a budget none fits, and the peak it reaches once written
        out: the last one found, when it was over the budget only once written out, else one
        solved (and checked written out) at the smallest budget the solver found; None when
        there is none. Its peak is a budget that works when passed back."""
        if self.last_found is not None:
            return self.last_found
        smallest = schedule.smallest_feasible_budget
        if smallest is None or smallest <= schedule.budget:
            return None
        fixed = schedule.intervals_per_node or self.remat.intervals  # the setting that found it
        quick = {} if self.remat.closest else {"time_limit": min(self.remat.time_limit, _CHECK_SECONDS)}
        again = Planner(replace(self.remat, budget=f"{smallest}B", closest=False, intervals=fixed, **quick),
                        self.schedules, self.resolved, self._solved)  # fmt: skip
        if schedule.smallest_intervals is not None:  # what the solver found there begins the solve
            again.given = ("the smallest budget's", schedule.smallest_intervals)
        try:
            again(model)
        except RematError:
            pass  # over that budget once written out: the last schedule still runs, at its peak
        if again.last_found is None and self.schedules[-1][1].has_schedule:  # solved before, at that budget
            found = self.schedules[-1][1]
            return found, max(self._measure(realize(model, found.intervals)[0]), default=0)
        return again.last_found

