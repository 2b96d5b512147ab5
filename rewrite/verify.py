"""Numerics check of a rewrite: run the graph before and after on the example inputs, with the
same random state, and compare outputs and gradients: of the float inputs, of every parameter
both graphs share, and at the inputs of the nodes the pass changed (what their backward
passes on). The gradients are those of a random projection of every output. Where those are
zero at every input of the changed nodes (an output layer initialised to zero), the values
the changed nodes feed are projected into the loss as well; a check that still sees no
non-zero gradient there says that it tested nothing. Buffers the run mutates (batch-norm
statistics) are restored, so checking leaves the model as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.graph import tensor_value
from rewrite.memory import SavedActivations, record_saved, run_recording_saved
from rewrite.state import buffers_kept, random_state_kept
from rewrite.training_step import TRAINING_STEP

# Relative error ||after - before|| / ||before|| allowed for "equal up to float rounding".
_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCE.get(dtype, 0.0)


@dataclass
class TensorError:
    name: str
    dtype: torch.dtype
    max_abs: float
    rel: float
    zero: bool = False  # zero in both graphs: equal, but the comparison showed nothing

    @property
    def within_rounding(self) -> bool:
        return self.rel <= tolerance(self.dtype)

    def describe(self) -> str:
        return f"{self.name}: relative error {self.rel:.3g} (max abs {self.max_abs:.3g}; rounding allows {tolerance(self.dtype):.0e})"


@dataclass
class Numerics:
    outputs: list[TensorError] = field(default_factory=list)
    grads: list[TensorError] = field(default_factory=list)
    saved_before: SavedActivations | None = None
    saved_after: SavedActivations | None = None
    grad_rel_error: float | None = None  # over all compared gradients concatenated; None when untested
    grad_cosine: float | None = None
    changed_inputs: list[str] = field(default_factory=list)  # nodes feeding the changed ones, whose gradients are compared
    probes: list[str] = field(default_factory=list)  # values projected into the loss besides the outputs
    grad_untested: str | None = None  # why the gradient check tested nothing for this pass

    @property
    def output_rel_error(self) -> float:
        return max((e.rel for e in self.outputs), default=0.0)

    @property
    def forward_within_rounding(self) -> bool:
        return all(e.within_rounding for e in self.outputs)

    @property
    def backward_within_rounding(self) -> bool:
        return all(e.within_rounding for e in self.grads)

    @property
    def zero_grads(self) -> list[str]:
        """The compared gradients that are zero in both graphs."""
        return [e.name for e in self.grads if e.zero]

    def worst(self, errors: list[TensorError]) -> TensorError | None:
        return max(errors, key=lambda e: e.rel / max(tolerance(e.dtype), 1e-30), default=None)


def _error(name: str, after: torch.Tensor, before: torch.Tensor) -> TensorError:
    if after.shape != before.shape:
        return TensorError(name, before.dtype, math.inf, math.inf)
    if not before.is_floating_point():
        equal = torch.equal(after, before)
        return TensorError(name, before.dtype, 0.0 if equal else math.inf, 0.0 if equal else math.inf)
    a, b = after.detach().double(), before.detach().double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return TensorError(name, before.dtype, math.inf, math.inf)
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    diff = a - b
    norm = b.norm().item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel = diff.norm().item() / norm if norm > 0 else (0.0 if max_abs == 0 else math.inf)
    return TensorError(name, before.dtype, max_abs, rel, zero=norm == 0 and max_abs == 0)


def changed_nodes(before: fx.Graph, after: fx.Graph) -> set[str]:
    """Names of the call nodes of ``after`` a pass added or altered: ``before`` has no node of
    that name with the same target and arguments (arguments compared by node name)."""

    def signature(node: fx.Node) -> str:
        return repr((node.target, fx.node.map_arg((node.args, node.kwargs), lambda a: a.name)))

    kept = {n.name: signature(n) for n in before.nodes}
    return {n.name for n in after.nodes if n.op == "call_function" and kept.get(n.name) != signature(n)}


def _around(graph: fx.Graph, changed: set[str]) -> tuple[list[str], list[str]]:
    """The unchanged call nodes with floating-point values that feed a changed node, and those
    a changed node feeds, in graph order. Both graphs have them, computed alike."""

    def unchanged_float(node: fx.Node) -> bool:
        value = tensor_value(node)
        return node.op == "call_function" and node.name not in changed and value is not None and value.is_floating_point()

    nodes = [n for n in graph.nodes if n.name in changed]
    feeding = {a for n in nodes for a in n.all_input_nodes if unchanged_float(a)}
    fed = {u for n in nodes for u in n.users if unchanged_float(u)}
    return [n.name for n in graph.nodes if n in feeding], [n.name for n in graph.nodes if n in fed]


def _inputs_for_check(args: tuple, kwargs: dict, input_grads: bool = True) -> tuple[tuple, dict]:
    """Copies of the inputs, the floating-point ones requiring gradients with ``input_grads``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    copies = [
        t.detach().clone().requires_grad_(input_grads) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in leaves
    ]
    return pytree.tree_unflatten(copies, spec)


@dataclass
class _Run:
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor | None]  # name -> gradient (None: the loss does not reach it)
    saved: SavedActivations
    differentiable: bool  # some output needs a gradient
    values: dict[str, Any]  # the values of the nodes named in watch, probes and keep


def _run(
    gm: fx.GraphModule,
    args: tuple,
    kwargs: dict,
    seed: int,
    targets: list[str],
    input_grads: bool = True,
    watch: Sequence[str] = (),
    probes: Sequence[str] = (),
    keep: Sequence[str] = (),
) -> _Run:
    """Forward + backward of sum(out * w) over the outputs and the values of the nodes named in
    ``probes``, with fixed random w; gradients of the parameters named in ``targets``, at the
    nodes named in ``watch`` and, with ``input_grads``, of the float inputs; the values of the
    nodes named in ``keep`` too."""
    call_args, call_kwargs = _inputs_for_check(args, kwargs, input_grads)
    params = dict(gm.named_parameters())
    step = getattr(gm, "meta", {}).get(TRAINING_STEP)
    scheduled = step is not None and step.applies(gm, call_args, call_kwargs)
    if scheduled:
        step.prepare(gm, call_args, call_kwargs)  # compile before recording what is saved
    with random_state_kept():
        torch.manual_seed(seed)
        if scheduled:
            with record_saved(gm) as saved:  # a training schedule (remat) decides what is saved
                out = step(gm, call_args, call_kwargs)
            values = {}
        else:
            out, saved, values = run_recording_saved(gm, call_args, call_kwargs, keep={*watch, *probes, *keep})
    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    inputs = [t for t in pytree.tree_leaves((call_args, call_kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    named = {f"grad of input {i}": t for i, t in enumerate(inputs)}
    named.update({f"grad of {n}": params[n] for n in targets})
    named.update({f"grad at {n}": values[n] for n in watch if values[n].requires_grad})
    projected = [o for o in outs if o.requires_grad] + [values[n] for n in probes if values[n].requires_grad]
    grads = dict.fromkeys(named)
    if projected and named:
        generator = torch.Generator().manual_seed(seed + 1)
        loss = sum(
            (t.double() * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)).sum()
            for t in projected
        )
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    return _Run([o.detach() for o in outs], grads, saved, any(o.requires_grad for o in outs), values)


def gradients_at(
    gm: fx.GraphModule, args: tuple, kwargs: dict, names: Sequence[str], keep: Sequence[str] = (), seed: int = 0
) -> tuple[dict[str, Any], dict[str, torch.Tensor | None]]:
    """One forward + backward of ``gm`` as ``compare`` runs it (same seed, same random
    projection of the outputs): the values of the nodes named in ``names`` and ``keep``, and
    the gradient at each of ``names`` (None where the projection does not reach it)."""
    with buffers_kept(gm):
        run = _run(gm, args, kwargs, seed, [], True, names, (), keep)
    return run.values, {n: run.grads.get(f"grad at {n}") for n in names}


def _all_zero(runs: list[_Run], names: list[str]) -> bool:
    """Whether some of ``names`` have gradients, and all of those are zero in every run."""
    grads = [run.grads[n] for run in runs for n in names if n in run.grads]
    return bool(grads) and all(g is None or not g.any() for g in grads)


def compare(before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict, seed: int = 0) -> Numerics:
    """Numerics of ``after`` against ``before`` on the given inputs.

    A graph with a training schedule (remat) is checked on the step it was planned for: the
    example inputs as given, so gradients of the parameters only (inputs that needed
    gradients would make another training graph, planned and solved again), and none at
    intermediate nodes (the schedule's compiled graphs keep them)."""
    after_params = dict(after.named_parameters())
    shared = [
        name
        for name, p in before.named_parameters()
        if p.requires_grad and after_params.get(name) is p  # the same tensor, not a folded replacement
    ]
    input_grads = TRAINING_STEP not in getattr(after, "meta", {})
    feeding, fed = _around(after.graph, changed_nodes(before.graph, after.graph)) if input_grads else ([], [])
    watched = [f"grad at {n}" for n in feeding]

    def run_both(probes: list[str]) -> list[_Run]:
        runs = []
        for gm in (before, after):
            with buffers_kept(before, after):
                runs.append(_run(gm, args, kwargs, seed, shared, input_grads, feeding, probes))
        return runs

    probes = []
    runs = run_both(probes)
    if fed and _all_zero(runs, watched):
        probes = fed
        runs = run_both(probes)
    run_b, run_a = runs

    numerics = Numerics(saved_before=run_b.saved, saved_after=run_a.saved, probes=probes)
    if len(run_a.outputs) != len(run_b.outputs):
        numerics.outputs.append(TensorError("number of outputs", torch.float32, math.inf, math.inf))
    for i, (a, b) in enumerate(zip(run_a.outputs, run_b.outputs)):
        numerics.outputs.append(_error(f"output {i}", a, b))
    flat_a, flat_b = [], []
    for name in dict.fromkeys([*run_b.grads, *run_a.grads]):
        ga, gb = run_a.grads.get(name), run_b.grads.get(name)
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        numerics.grads.append(_error(name, ga, gb))
        flat_a.append(ga.detach().double().reshape(-1))
        flat_b.append(gb.detach().double().reshape(-1))
    compared = {e.name for e in numerics.grads}
    numerics.changed_inputs = [n for n, w in zip(feeding, watched) if w in compared]
    numerics.grad_untested = _untested(numerics, run_b)
    if numerics.grad_untested is None:
        a, b = torch.cat(flat_a), torch.cat(flat_b)
        numerics.grad_rel_error = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
        numerics.grad_cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return numerics


def _untested(numerics: Numerics, run: _Run) -> str | None:
    """Why the gradients compared test nothing of the pass, or None when they test something."""
    if not any(o.is_floating_point() for o in run.outputs):
        return "no output is floating point"
    if not run.differentiable:
        return "no output needs a gradient: no floating-point input or trainable parameter reaches the outputs"
    if not numerics.grads:
        return "nothing to compare: no input is floating point, and every parameter reaching the outputs was replaced"
    at_changed = {f"grad at {n}" for n in numerics.changed_inputs}
    if at_changed and all(e.zero for e in numerics.grads if e.name in at_changed):
        names = ", ".join(numerics.changed_inputs[:5]) + (", …" if len(at_changed) > 5 else "")
        also = ", also with the values the changed nodes feed projected into the loss" if numerics.probes else ""
        return f"every gradient at the inputs of the nodes the pass changed ({names}) is zero in both graphs{also}"
    if all(e.zero for e in numerics.grads):
        return "every gradient compared is zero in both graphs"
    return None


def saved_by_model(model: torch.nn.Module, args: tuple, kwargs: dict) -> SavedActivations:
    """What autograd saves for the backward when ``model`` itself runs on the inputs, counted
    as for the graphs (distinct storages, float inputs requiring gradients), in the mode the
    model is in; its buffers and the random state are left as they were."""
    call_args, call_kwargs = _inputs_for_check(args, kwargs)
    with buffers_kept(model), random_state_kept(), record_saved(model) as saved:
        model(*call_args, **call_kwargs)
    return saved
