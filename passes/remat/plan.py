"""remat's planning: the budget in bytes, and a schedule that meets it once written out.

``Planner`` solves one ``rewrite.liveness.MemoryModel`` with CP-SAT in the Moccasin
formulation (``solvers.moccasin``) and checks the schedule on the graph ``realize`` writes
(``passes.remat.lower``); when that step is over the budget it solves again with the excess
off the budget. No schedule raises ``RematError`` with what budget would do.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from passes.remat.lower import realize
from passes.remat.report import explain
from rewrite.errors import PassError
from rewrite.liveness import MemoryModel, liveness_profile

if TYPE_CHECKING:
    from passes.remat import Remat

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
# Solves again, each with the budget lowered by the excess, when a realized step is over it.
_RETRIES = 2
# The CP-SAT model grows with the square of the intervals per tensor (a 500-node graph: 0.06 s
# and 5k variables to build at 2, 0.8 s and 62k at 8, 13 s, 830k and 1.4 GB at 32).
MAX_INTERVALS = 8


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


@dataclass
class Planner:
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
            more = self.remat.intervals + 1 if self.remat.intervals < MAX_INTERVALS else None
            raise RematError(explain(schedule, plain_peak, realized if self.resolved else None, more))
        self._solved[problem] = schedule
        return schedule.intervals
