"""remat's plan cache on disk: a schedule solved once is read back, not solved again.

The key is the sha256 of a canonical JSON of the problem: the units in order with their bytes,
costs (left out for the ``measured`` cost model, whose timings differ run to run: the ops'
targets stand for them, as they do always) and whether they may be recomputed, the edges,
the units kept to the end, the budget in bytes, the ``intervals`` option, the cost model and
the versions of this package and of OR-Tools. The value is the schedule's retention intervals
as JSON with what the solver said about them. Nothing from the file is trusted: it is parsed
with ``json`` (never unpickled or executed), its types are checked, every name must be a unit
of the model, and the schedule must pass ``solvers.schedule.validate`` within the budget with
no more intervals per unit than the option allows; a file that fails (corrupt, foreign, of
another problem) is ignored with a one-line warning and the problem is solved again.

A cached schedule that was cut off by a time limit shorter than the one now asked for is
solved again (it might improve); one that stopped for any other reason (proved optimal,
within the gap, stalled) stands.

Location: ``$REWRITE_PLAN_CACHE``, else ``$XDG_CACHE_HOME/rewrite/plans``, else
``~/.cache/rewrite/plans``; one file per key, written to a temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import networkx as nx

from rewrite.liveness import MemoryModel
from solvers.schedule import Schedule, peak_memory, recompute_cost, validate

FORMAT = 1
_MAX_BYTES = 64 * 2**20  # a plan of a 100k-unit graph is a few MB; anything larger is not ours
_STATUSES = ("optimal", "feasible")
_STOPS = ("optimal", "gap", "stalled", "time_limit")


def cache_dir() -> Path:
    explicit = os.environ.get("REWRITE_PLAN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rewrite" / "plans"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("rewrite", "ortools"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def problem_key(graph: nx.DiGraph, model: MemoryModel, budget: int, intervals: int, cost: str) -> str:
    """sha256 of the canonical JSON of the problem ``graph`` (the solver's, over ``model.order``)
    poses at ``budget`` bytes."""
    targets = {u.name: str(u.node.target) for u in model.units}
    problem = {
        "format": FORMAT,
        "units": [
            [name, int(graph.nodes[name]["mem"]), None if cost == "measured" else float(graph.nodes[name]["cost"]),
             bool(graph.nodes[name].get("recompute", True)), targets.get(name)]
            for name in model.order
        ],  # fmt: skip
        "edges": sorted([str(u), str(v)] for u, v in graph.edges),
        "keep": sorted(str(name) for name in model.keep),
        "budget": int(budget),
        "intervals": int(intervals),
        "cost": cost,
        "solver": "moccasin",
        "versions": _versions(),
    }
    text = json.dumps(problem, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def has(key: str) -> bool:
    """Whether a plan is stored under ``key`` (``load`` checks that it holds)."""
    return _path(key).is_file()


def load(
    key: str, graph: nx.DiGraph, model: MemoryModel, budget: int, intervals: int, time_limit: float
) -> Schedule | None:
    """The cached schedule for ``key`` when there is one that holds for this problem; None
    otherwise (a file that does not hold is named in a warning)."""
    path = _path(key)
    started = time.perf_counter()
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise ValueError(f"larger than {_MAX_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
        found = _checked(data, key, graph, model, budget, intervals)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # json's errors and ScheduleError are ValueErrors;
        # RecursionError: JSON nested deeper than Python's parser goes
        warnings.warn(f"remat: ignoring the cached plan {path}: {exc}", stacklevel=3)
        return None
    if found["stopped"] == "time_limit" and found["time_limit"] < time_limit:
        return None  # cut off sooner than now allowed: solving again may do better
    spans = found["intervals"]
    objective = recompute_cost(graph, spans)
    return Schedule(found["status"], objective, min(found["bound"], objective), spans, time.perf_counter() - started,
                    "moccasin", budget, peak_memory(graph, model.order, spans), phase_one=found["phase_one"],
                    stopped=found["stopped"], plan_cache="hit")  # fmt: skip


def _checked(data, key: str, graph: nx.DiGraph, model: MemoryModel, budget: int, intervals: int) -> dict:
    """``data`` as a cached plan of this problem, or ValueError / ScheduleError saying why not."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        raise ValueError("not a plan of this problem (format or key differs)")
    spans = data.get("intervals")
    if not isinstance(spans, dict) or set(spans) != set(model.order):
        raise ValueError("its intervals do not name exactly the units of this graph")
    checked = {}
    for name, value in spans.items():
        if not isinstance(value, list) or not 1 <= len(value) <= intervals:
            raise ValueError(f"unit {name!r}: expected 1 to {intervals} intervals")
        pairs = []
        for pair in value:
            if not (isinstance(pair, list) and len(pair) == 2 and all(type(t) is int for t in pair)):
                raise ValueError(f"unit {name!r}: an interval is not a pair of integers")
            pairs.append((pair[0], pair[1]))
        checked[name] = pairs
    validate(graph, model.order, checked, budget, model.keep)
    status, stopped, phase_one = data.get("status"), data.get("stopped"), data.get("phase_one")
    bound, time_limit = data.get("bound"), data.get("time_limit")
    if status not in _STATUSES or stopped not in _STOPS:
        raise ValueError("unknown status or stop reason")
    if not isinstance(phase_one, str) or len(phase_one) > 100:
        raise ValueError("phase_one is not a short string")
    for number in (bound, time_limit):
        if type(number) not in (int, float) or number != number or number in (float("inf"), float("-inf")):
            raise ValueError("bound or time_limit is not a finite number")
    return {"intervals": checked, "status": status, "stopped": stopped, "phase_one": phase_one,
            "bound": float(bound), "time_limit": float(time_limit)}  # fmt: skip


def store(key: str, schedule: Schedule, time_limit: float) -> None:
    """Write ``schedule`` under ``key`` (a temporary file renamed into place); a cache that
    cannot be written is named in a warning and otherwise ignored."""
    data = {
        "format": FORMAT,
        "key": key,
        "status": schedule.status,
        "stopped": schedule.stopped or "time_limit",
        "phase_one": schedule.phase_one,
        "bound": float(schedule.bound if schedule.bound is not None else 0.0),
        "time_limit": float(time_limit),
        "intervals": {str(name): [[int(s), int(e)] for s, e in spans] for name, spans in schedule.intervals.items()},
    }
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, separators=(",", ":"), allow_nan=False)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        warnings.warn(f"remat: could not write the plan cache {path}: {exc}", stacklevel=3)
