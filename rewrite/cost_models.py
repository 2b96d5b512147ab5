"""What running an op once costs, by one of ``COST_MODELS``; the price a schedule that
recomputes tensors pays (``rewrite.liveness.MemoryModel`` puts it on every storage).

- ``flops`` (the default): its FLOPs (``torch.utils.flop_counter``, which counts matmuls,
  convolutions and attention) plus one per byte it reads and writes. Recomputing a matmul or
  convolution weighs far more than a pointwise op over the same tensors (what PyTorch's
  min-cut partitioner assumes, as it is where pointwise ops are fused): the schedule
  recomputes the fewest FLOPs, and the fewest bytes among those.
- ``roofline``: the larger of its FLOPs and ``FLOPS_PER_BYTE`` times the bytes it moves.
  Nearer the time an op takes when each op runs on its own, as these graphs do: a pointwise
  op over a large tensor can cost more than a small convolution.
- ``measured``: the time the op takes on this machine, in nanoseconds, run on random tensors
  of its inputs' shapes (``measure_op_times``); an op that cannot run that way gets its
  roofline cost at the measured ops' typical time per unit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import unset_fake_temporarily

from rewrite.graph import concrete, node_bytes, node_flops
from rewrite.node_kinds import is_random

# Machine balance used to put memory-bound ops on the FLOP scale (about that of a CPU core or
# a GPU's pointwise path; only the ratio between ops matters to the solvers).
FLOPS_PER_BYTE = 10
COST_MODELS = ("flops", "roofline", "measured")
DEFAULT_COST = "flops"


def op_costs(nodes: Iterable[fx.Node], cost: str | None = DEFAULT_COST) -> tuple[dict[str, int], dict[fx.Node, float]]:
    """The FLOPs of each op (by node name) and what running it once costs by the ``cost``
    model (one of ``COST_MODELS``; None leaves every cost and FLOP count 0, as counting FLOPs
    runs each op on fake tensors). A node given twice counts once."""
    flops: dict[str, int] = {}
    costs: dict[fx.Node, float] = {}
    for node in nodes:
        if node.name in flops:
            continue
        try:
            flops[node.name] = node_flops(node) if cost is not None else 0
        except Exception:  # an op the flop counter cannot run on fake tensors: bytes only
            flops[node.name] = 0
        moved = node_bytes(node) + sum(node_bytes(a) for a in node.all_input_nodes)
        if cost == "flops":
            costs[node] = flops[node.name] + moved
        else:
            costs[node] = max(flops[node.name], FLOPS_PER_BYTE * moved) if cost is not None else 0
    if cost == "measured":
        costs = _measured_costs(costs)
    return flops, costs


def _real_like(value: Any, generators: dict) -> Any:
    """A real tensor with ``value``'s shape, strides, dtype and device (random floats drawn from
    ``generators``, one per device, so the user's random state is left alone; zero integers:
    valid indices), or the value itself when it is not a tensor."""
    if isinstance(value, (list, tuple)):
        return type(value)(_real_like(v, generators) for v in value)
    if not isinstance(value, torch.Tensor):
        return concrete(value)
    shape = [int(concrete(s)) for s in value.shape]
    stride = [int(concrete(s)) for s in value.stride()]
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    device = value.device
    if value.dtype.is_floating_point or value.dtype.is_complex:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(0)
        flat = torch.randn(size, dtype=value.dtype, device=device, generator=generators[device])
    else:
        flat = torch.zeros(size, dtype=value.dtype, device=device)
    return flat.as_strided(shape, stride)


def _op_signature(node: fx.Node) -> Any:
    """What an op's time depends on: its target, its inputs' shapes, strides, dtypes and
    devices, and its other arguments. Nodes with one signature are timed once (and so get
    one cost: the solver's symmetric choices stay symmetric)."""

    def describe(value):
        if isinstance(value, fx.Node):
            value = value.meta["val"]
        if isinstance(value, torch.Tensor):
            sizes = tuple(int(concrete(n)) for n in (*value.shape, *value.stride()))
            return ("tensor", sizes, value.dtype, str(value.device))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        return repr(concrete(value))  # symbolic sizes at their example values

    return (str(node.target), describe(node.args), describe(node.kwargs))


def measure_op_times(nodes: list[fx.Node], repeats: int = 3) -> dict[fx.Node, float | None]:
    """Seconds each call_function node takes on this machine: the fastest of ``repeats`` runs
    after one warm-up, on tensors made from its inputs' ``meta["val"]`` (``_real_like``) and
    freed after it; nodes with the same ``_op_signature`` are timed once. None for a node
    that cannot run that way (its metadata is missing, or its op needs values random ones do
    not give) and for random ops, which would draw from the user's generator (they are never
    recomputed: their cost does not matter)."""
    with unset_fake_temporarily():  # AOTAutograd partitions under its fake mode: run for real
        return _time_ops(nodes, repeats)


def _time_ops(nodes: list[fx.Node], repeats: int) -> dict[fx.Node, float | None]:
    times: dict[fx.Node, float | None] = {}
    timed: dict[Any, float | None] = {}
    generators: dict = {}
    for node in nodes:
        times[node] = None
        # an op that outputs no tensor (an assert, say) frees nothing when recomputed, and
        # one that draws random numbers is never recomputed: neither is worth running
        if node.op != "call_function" or is_random(node) or node_bytes(node) == 0:
            continue
        try:
            signature = _op_signature(node)
            if signature in timed:
                times[node] = timed[signature]
                continue
            timed[signature] = None
            args = fx.node.map_arg(node.args, lambda a: _real_like(a.meta["val"], generators))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: _real_like(a.meta["val"], generators))
            tensors = [*pytree.tree_leaves((args, kwargs)), *pytree.tree_leaves(node.meta.get("val"))]
            cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
            best = math.inf
            with torch.no_grad():
                for i in range(repeats + 1):
                    if cuda:
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    out = node.target(*args, **kwargs)
                    if cuda:
                        torch.cuda.synchronize()
                    if i:
                        best = min(best, time.perf_counter() - started)
                    del out
            times[node] = timed[signature] = best
        except Exception:  # missing metadata, or values random ones do not give
            continue
    if any(device.type == "cuda" for device in generators):
        torch.cuda.empty_cache()  # the timed ops' blocks go back: the step is measured after
    return times


def _measured_costs(roofline: dict[fx.Node, float]) -> dict[fx.Node, float]:
    """Nanoseconds per op (``measure_op_times``); an op that cannot be timed gets its roofline
    cost at the median time per roofline unit of the ops that could."""
    times = measure_op_times(list(roofline))
    ratios = sorted(t / roofline[n] for n, t in times.items() if t is not None and roofline[n] > 0)
    per_unit = ratios[len(ratios) // 2] if ratios else 1e-9 / FLOPS_PER_BYTE
    return {n: 1e9 * (t if t is not None else roofline[n] * per_unit) for n, t in times.items()}
