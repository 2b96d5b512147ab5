"""A rewritten module's training calls run as a forward and a backward graph that a pass chose.

AOTAutograd traces a call's forward and backward into one *joint* graph and hands it to a
partition function, which splits it into the forward graph (whose extra outputs are what the
backward reads: the saved tensors) and the backward graph. A pass that decides that split
(remat: what to save and what to recompute) leaves a ``TrainingStep`` with its partition
function in the graph module's ``meta[TRAINING_STEP]``; the rewritten module runs its training
calls (grad enabled, in train mode) through it, and everything else through its graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree

from rewrite.memory import flatten_inputs
from rewrite.node_kinds import is_alias
from rewrite.state import buffers_kept, random_state_kept

TRAINING_STEP = "training_step"  # the graph module's meta key that holds its TrainingStep

# (joint graph, number of forward outputs, placeholders the step may update in place) -> what
# the partition chose: an object whose ``forward`` and ``backward`` are GraphModules.
Partitioner = Callable[[fx.GraphModule, int, frozenset[str]], Any]


def graph_fingerprint(gm: fx.GraphModule) -> str:
    return gm.code


def _with_strides(value: Any, strides: tuple | None) -> Any:
    """``value``, copied into a tensor of ``strides`` where its own differ in a dimension that
    matters (size above 1); as it is without strides to follow (``None``, symbolic ones)."""
    if not isinstance(value, torch.Tensor) or strides is None or len(strides) != value.dim():
        return value
    if not all(isinstance(s, int) for s in strides):
        return value  # symbolic: the trace fixed no layout
    if all(size < 2 or a == b for size, a, b in zip(value.shape, value.stride(), strides)):
        return value
    return torch.empty_strided(value.shape, strides, dtype=value.dtype, device=value.device).copy_(value)


def _layout(traced: Any) -> Any:
    """The layout of a traced (fake) value to hold an op's output to: (shape, strides) of a
    tensor with concrete ones, a list of those for a tuple, None where there is nothing to
    hold to (symbolic sizes, non-tensors)."""
    if isinstance(traced, (tuple, list)):
        parts = [_layout(t) for t in traced]
        return parts if any(p is not None for p in parts) else None
    if isinstance(traced, torch.Tensor):
        shape, strides = tuple(traced.shape), tuple(traced.stride())
        if all(isinstance(n, int) for n in (*shape, *strides)):
            return shape, strides
    return None


def _in_layout(value: Any, layout: Any) -> Any:
    """``value`` (an op's output: a tensor or a tuple of them) in ``layout`` (``_layout``)."""
    if isinstance(layout, list):
        if not isinstance(value, (tuple, list)) or len(value) != len(layout):
            return value
        fixed = [v if part is None else _in_layout(v, part) for v, part in zip(value, layout)]
        return value if all(f is v for f, v in zip(fixed, value)) else type(value)(fixed)
    shape, strides = layout
    if not isinstance(value, torch.Tensor) or value.stride() == strides or value.shape != shape:
        return value
    return _with_strides(value, strides)


class _TracedLayout(fx.Interpreter):
    """Runs a traced graph with every op's output in the layout it was traced with.

    AOTAutograd decomposes the step on fake tensors, whose strides come from the ops' meta
    kernels; where an eager kernel returns another layout (the CPU batch norm of a transposed
    input returns a contiguous tensor, its meta kernel one strided like the input), a view the
    trace wrote for the traced layout (``linear`` on the transposed back result becomes
    ``view`` + ``mm``) fails or reads the wrong elements. Views follow their base, so only the
    outputs of ops that own their memory are put back into the traced layout. ``layouts``
    (``traced_layouts``) is computed once per graph: checking a node costs one stride
    comparison."""

    def __init__(self, gm: fx.GraphModule, layouts: dict[fx.Node, Any]):
        super().__init__(gm)
        self.layouts = layouts

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        layout = self.layouts.get(n)
        return out if layout is None else _in_layout(out, layout)


def traced_layouts(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Node -> the layout its output is held to, for the ops of ``gm`` that own their memory."""
    layouts = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and not is_alias(n):
            layout = _layout(n.meta.get("val"))
            if layout is not None:
                layouts[n] = layout
    return layouts


def _boxed(gm: fx.GraphModule, example_inputs) -> Callable:
    """Run a graph through the Interpreter in the boxed convention: arguments are released as
    soon as their last use has run (the saved tensors in the backward, in particular), each
    op's output in the layout it was traced with (``_TracedLayout``)."""

    layouts = traced_layouts(gm)

    def run(args: list) -> Any:
        return _TracedLayout(gm, layouts).boxed_run(args)

    run._boxed_call = True
    return run


class _Interpreted(torch.nn.Module):
    """Runs a GraphModule node by node with each node's metadata current, so the joint
    graph's nodes carry the module path and stack trace of the node they came from."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, args, kwargs):
        with fx_traceback.preserve_node_meta():
            # the graph's flat outputs: the caller rebuilds the model's output structure
            return fx.Interpreter(self.gm).run(*flatten_inputs(self.gm, args, kwargs), enable_io_processing=False)


class TrainingStep:
    """Runs a GraphModule's training calls through AOTAutograd, split by ``partitioner``.

    Compiled once per graph and input signature (shapes, dtypes, which tensors need
    gradients); the partitioner is asked again for each, and ``partitions`` keeps what it
    chose. Its ``mutable_inputs`` are the joint graph's placeholders of the module's buffers.
    Parameters and buffers are read from the module at each call, so the compiled step
    follows the module's weights (and updates its batch-norm statistics in place).
    ``on_compile`` is told ``recompile_note`` when a call compiles the step again.
    """

    recompile_note = "new input shapes or graph: tracing the training step again"

    def __init__(self, partitioner: Partitioner, on_compile: Callable[[str], None] | None = None):
        self.partitioner = partitioner
        self.on_compile = on_compile
        self._compiled: dict[Any, tuple[Callable, list]] = {}  # key -> compiled step, input layouts
        self.partitions: dict[Any, Any] = {}

    def __deepcopy__(self, memo):
        # compiled steps read every tensor from their arguments: a copy may share them
        return self

    def applies(self, gm: fx.GraphModule, args, kwargs) -> bool:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return any(p.requires_grad for p in gm.parameters()) or any(t.requires_grad for t in tensors)

    def _key(self, gm, state, leaves):
        def describe(t):
            if isinstance(t, torch.Tensor):
                return (tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
            return (type(t).__name__, t if isinstance(t, (int, float, bool, str, type(None))) else id(t))

        return (graph_fingerprint(gm), tuple(state), tuple(describe(t) for t in [*state.values(), *leaves]))

    def _compiled_for(self, gm: fx.GraphModule, args: tuple, kwargs: dict):
        from torch._functorch.aot_autograd import aot_function

        params = dict(gm.named_parameters())
        state = {**params, **dict(gm.named_buffers())}
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = self._key(gm, state, leaves)
        if key not in self._compiled:
            names, count = list(state), len(state)
            interpreted = _Interpreted(gm)

            def step(*flat):
                call_args, call_kwargs = pytree.tree_unflatten(list(flat[count:]), spec)
                state = {f"gm.{name}": t for name, t in zip(names, flat[:count])}
                return torch.func.functional_call(interpreted, state, (call_args, call_kwargs))

            def partition_fn(joint, _joint_inputs, *, num_fwd_outputs, **_ignored):
                # AOTAutograd names the flat inputs primals_1, primals_2, ...: parameters, then buffers
                buffers = frozenset(f"primals_{i + 1}" for i in range(len(params), count))
                chosen = self.partitioner(joint, num_fwd_outputs, buffers)
                self.partitions[key] = chosen
                return chosen.forward, chosen.backward

            compiled = aot_function(
                step,
                fw_compiler=_boxed,
                bw_compiler=_boxed,
                partition_fn=partition_fn,
                num_params_buffers=count,
            )
            # the layouts the step is traced with: later inputs are put into them (a transposed
            # batch where a contiguous one was traced), as the graph's views are written for them
            layouts = [t.stride() if isinstance(t, torch.Tensor) else None for t in leaves]
            self._compiled[key] = compiled, layouts
        compiled, layouts = self._compiled[key]
        leaves = [_with_strides(t, strides) for t, strides in zip(leaves, layouts)]
        return key, compiled, [*state.values(), *leaves]

    def prepare(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        """Trace, partition and compile the step for these inputs without changing anything:
        the forward runs once (AOTAutograd compiles on a call) with the random state forked and
        the buffers restored afterwards. Returns what the partitioner chose."""
        key, compiled, flat = self._compiled_for(gm, args, kwargs)
        if key not in self.partitions:
            with buffers_kept(gm), random_state_kept():
                compiled(*flat)
        return self.partitions[key]

    def __call__(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        key, compiled, flat = self._compiled_for(gm, args, kwargs)
        if key not in self.partitions and self.on_compile:
            self.on_compile(self.recompile_note)
        out = compiled(*flat)
        return gm.graph._codegen.process_outputs(out)
