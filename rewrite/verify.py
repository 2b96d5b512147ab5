"""Numerics check of a rewrite: run the graph before and after on the example inputs, with the
same random state, and compare outputs and gradients (w.r.t. the float inputs and every
parameter both graphs share). Buffers the run mutates (batch-norm statistics) are restored,
so checking leaves the model as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.memory import SavedActivations, record_saved, run_recording_saved

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
    grad_rel_error: float | None = None  # over all compared gradients concatenated
    grad_cosine: float | None = None

    @property
    def output_rel_error(self) -> float:
        return max((e.rel for e in self.outputs), default=0.0)

    @property
    def forward_within_rounding(self) -> bool:
        return all(e.within_rounding for e in self.outputs)

    @property
    def backward_within_rounding(self) -> bool:
        return all(e.within_rounding for e in self.grads)

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
    return TensorError(name, before.dtype, max_abs, rel)


def _run(gm: fx.GraphModule, args: tuple, kwargs: dict, seed: int, targets: list[str], input_grads: bool = True):
    """Forward + backward of sum(out * w) with fixed random w; grads for the parameters named
    in ``targets`` and, with ``input_grads``, for the float inputs."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    inputs = [
        t.detach().clone().requires_grad_(input_grads) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in leaves
    ]
    call_args, call_kwargs = pytree.tree_unflatten(inputs, spec)
    params = dict(gm.named_parameters())
    # manual_seed reseeds every GPU too: fork (and so restore) the generators of all of them.
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    step = getattr(gm, "meta", {}).get("training_step")
    scheduled = step is not None and step.applies(gm, call_args, call_kwargs)
    if scheduled:
        step.prepare(gm, call_args, call_kwargs)  # compile before recording what is saved
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        if scheduled:
            with record_saved(gm) as saved:  # a training schedule (remat) decides what is saved
                out = step(gm, call_args, call_kwargs)
        else:
            out, saved = run_recording_saved(gm, call_args, call_kwargs)
    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_targets = grad_inputs + [params[name] for name in targets]
    differentiable = [o for o in outs if o.requires_grad]
    grads = []
    if differentiable and grad_targets:
        generator = torch.Generator().manual_seed(seed + 1)
        loss = sum(
            (o.double() * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device)).sum()
            for o in differentiable
        )
        grads = torch.autograd.grad(loss, grad_targets, allow_unused=True)
    names = [f"grad of input {i}" for i in range(len(grad_inputs))] + [f"grad of {n}" for n in targets]
    return [o.detach() for o in outs], list(zip(names, grads)), saved


def compare(before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict, seed: int = 0) -> Numerics:
    """Numerics of ``after`` against ``before`` on the given inputs.

    A graph with a training schedule (remat) is checked on the step it was planned for: the
    example inputs as given, so gradients of the parameters only (inputs that needed
    gradients would make another training graph, planned and solved again)."""
    after_params = dict(after.named_parameters())
    shared = [
        name
        for name, p in before.named_parameters()
        if p.requires_grad and after_params.get(name) is p  # the same tensor, not a folded replacement
    ]
    buffers = {id(b): (b, b.detach().clone()) for m in (before, after) for b in m.buffers()}

    def restore():
        with torch.no_grad():
            for tensor, value in buffers.values():
                tensor.copy_(value)

    input_grads = "training_step" not in getattr(after, "meta", {})
    try:
        outs_b, grads_b, saved_b = _run(before, args, kwargs, seed, shared, input_grads)
        restore()
        outs_a, grads_a, saved_a = _run(after, args, kwargs, seed, shared, input_grads)
    finally:
        restore()

    numerics = Numerics(saved_before=saved_b, saved_after=saved_a)
    if len(outs_a) != len(outs_b):
        numerics.outputs.append(TensorError("number of outputs", torch.float32, math.inf, math.inf))
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        numerics.outputs.append(_error(f"output {i}", a, b))
    flat_a, flat_b = [], []
    for (name, ga), (_, gb) in zip(grads_a, grads_b):
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        numerics.grads.append(_error(name, ga, gb))
        flat_a.append(ga.detach().double().reshape(-1))
        flat_b.append(gb.detach().double().reshape(-1))
    if flat_b:
        a, b = torch.cat(flat_a), torch.cat(flat_b)
        numerics.grad_rel_error = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
        numerics.grad_cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return numerics
