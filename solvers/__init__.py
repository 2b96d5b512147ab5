"""Optimisation models with no torch in their interface (networkx graphs in, schedules out).

- ``schedule``: the problem (a DiGraph with ``mem`` and ``cost`` per node, a topological
  order, a budget), schedules as retention intervals, their memory profile, validation, and
  a generator of random layered graphs like the RL benchmarks.
- ``moccasin``: rematerialization under a memory budget with OR-Tools CP-SAT in the Moccasin
  formulation (C retention intervals per node, one cumulative constraint).
- ``checkmate``: the Checkmate MILP baseline (O(n^2) booleans, frontier-advancing stages) on
  the same input, with OR-Tools' MILP interface.
"""
