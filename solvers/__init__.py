"""Optimisation models with no torch in their interface (networkx graphs in, schedules out),
used by the passes that must choose under a budget. Empty until the first such pass lands."""
