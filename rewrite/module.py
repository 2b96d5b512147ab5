"""The module ``optimize`` returns: a GraphModule that is called like the original model,
trains, switches between train and eval, and carries ``before``, ``after`` and ``report``."""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from rewrite.errors import RewriteError
from rewrite.graph import attr_owner, module_path
from rewrite.training_step import TRAINING_STEP

aten = torch.ops.aten

# Ops whose behaviour torch.export records as a flag: (argument index of the flag).
_MODE_FLAG_ARG = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.batch_norm.default: 5,
}


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of ``gm``'s graph and module containers, holding the
    same parameter and buffer tensors (nothing is copied but the structure)."""
    clone = fx.GraphModule(gm, _copy_graph(gm.graph), class_name=type(gm).__name__)
    clone.meta = dict(getattr(gm, "meta", {}))
    _copy_buffer_persistence(gm, clone)
    return clone


def structure_only(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` for inspection whose parameters and buffers are meta tensors (shapes
    and dtypes, no data), so that keeping it does not keep the weights alive."""
    clone = clone_graph_module(gm)
    for name, tensor in [*clone.named_parameters(), *clone.named_buffers()]:
        owner, leaf = attr_owner(clone, name)
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(meta, requires_grad=tensor.requires_grad))
        else:
            setattr(owner, leaf, meta)
    return clone


def _copy_buffer_persistence(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """GraphModule registers every buffer it copies as persistent; mark again those that were
    not (state_dict() must have the keys the original model's has)."""
    for name, _ in source.named_buffers():
        owner, leaf = attr_owner(source, name)
        if leaf in owner._non_persistent_buffers_set:
            try:
                target_owner, _ = attr_owner(target, name)
            except AttributeError:
                continue  # the copy does not read this buffer
            target_owner._non_persistent_buffers_set.add(leaf)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    with warnings.catch_warnings():
        # deepcopy of torch.export's pytree specs warns about a deprecated isinstance check inside torch
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def _is_batch_counter_increment(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.add_.Tensor:
        return False
    counter = node.args[0]
    return isinstance(counter, fx.Node) and counter.op == "get_attr" and counter.target.endswith("num_batches_tracked")


def _mode_flags(graph: fx.Graph):
    """(node, argument index) of every train/eval flag torch.export recorded in the graph."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        index = _MODE_FLAG_ARG.get(node.target)
        if index is None or len(node.args) <= index:
            continue
        if node.target is aten.batch_norm.default and node.args[3] is None:
            continue  # no running statistics: batch statistics in both modes
        yield node, index


def set_graph_mode(gm: fx.GraphModule, training: bool) -> bool:
    """Flip the train/eval flags recorded in the graph (dropout, batch norm with running
    statistics, the batch counter); True when anything changed."""
    changed = False
    for node, index in _mode_flags(gm.graph):
        if node.args[index] != training:
            node.update_arg(index, training)
            changed = True
    increment = 1 if training else 0
    for node in gm.graph.nodes:
        if _is_batch_counter_increment(node) and node.args[1] != increment:
            node.update_arg(1, increment)
            changed = True
    if changed:
        gm.recompile()
    return changed


def first_mode_difference(captured: fx.GraphModule, other: fx.GraphModule, training: bool) -> str | None:
    """Where the graph ``captured`` in one mode, switched by ``set_graph_mode`` to ``training``,
    first differs from the graph ``other`` captured in that mode; None where they compute alike."""
    pairs = itertools.zip_longest(
        _switched_form(captured.graph, training), _switched_form(other.graph, training), fillvalue=(None, None)
    )
    for (node, form), (other_node, other_form) in pairs:
        if form == other_form:
            continue
        if node is None:
            return f"the other mode's graph goes on with node {_describe(other_node)}"
        if other_node is None or other_node.name == node.name:
            return f"at node {_describe(node)}"
        return f"at node {_describe(node)}, where the other mode's graph has {other_node.name}"
    return None


def _describe(node: fx.Node) -> str:
    return f"{node.name} in {module_path(node) or 'the top-level module'}"


def _switched_form(graph: fx.Graph, training: bool) -> list[tuple[fx.Node, str]]:
    """Each node with its op, target and arguments as text (nodes given by position) as
    ``set_graph_mode(training)`` would make it, leaving out the batch counter increments (absent
    from an eval graph) and the probability of a dropout that is off (the identity whatever it is).
    Sizes are written into the nodes that use them: where torch.export puts them varies."""
    flags = dict(_mode_flags(graph))
    texts: dict[fx.Node, str] = {}
    form = []
    for node in graph.nodes:
        if _is_batch_counter_increment(node):
            continue
        args = list(node.args)
        if node in flags:
            args[flags[node]] = training
            if node.target is not aten.batch_norm.default and not training:
                args[1] = None
        text = repr((node.op, node.target, fx.node.map_arg((tuple(args), node.kwargs), texts.__getitem__)))
        if isinstance(node.meta.get("val"), torch.SymInt):
            texts[node] = text
        else:
            texts[node] = f"%{len(form)}"
            form.append((node, text))
    return form


@dataclass
class RewriteInfo:
    model_name: str  # the user's model class
    mode: str  # "train" or "eval": the mode it was captured in
    before: fx.GraphModule | None
    report: Any  # a Report, or its dict when loaded from a file
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any

    @property
    def fixed_mode(self) -> str | None:
        """Why the module cannot switch to the other mode (None: it can). Kept in the report,
        so that a module loaded from a file keeps it too."""
        if isinstance(self.report, dict):
            return self.report.get("fixed_mode")
        return getattr(self.report, "fixed_mode", None)


class RewrittenModule(fx.GraphModule):
    """A rewritten model. Call it like the original; ``.train()`` / ``.eval()`` switch the
    mode-dependent ops torch.export recorded (dropout, batch norm). Branches of the model's
    Python on ``self.training`` were fixed when it was captured: where they make the other
    mode's graph differ, switching to it raises ``RewriteError``.

    ``before``: the captured graph (for inspection: its tensors are meta tensors); ``after``:
    this graph; ``report``: what the passes did.
    """

    def __init__(self, graph_module: fx.GraphModule, info: RewriteInfo):
        super().__init__(graph_module, _copy_graph(graph_module.graph), class_name="RewrittenModule")
        self.meta = dict(getattr(graph_module, "meta", {}))
        _copy_buffer_persistence(graph_module, self)
        self.rewrite_info = info
        flags = [bool(node.args[index]) for node, index in _mode_flags(self.graph)]
        self.training = flags[0] if flags else info.mode == "train"

    def __deepcopy__(self, memo):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # as in _copy_graph
            copied = super().__deepcopy__(memo)  # keeps only what the graph reads
        copied.rewrite_info = copy.deepcopy(self.rewrite_info, memo)
        _copy_buffer_persistence(self, copied)
        return copied

    @property
    def before(self) -> fx.GraphModule | None:
        return self.rewrite_info.before

    @property
    def after(self) -> fx.GraphModule:
        return self

    @property
    def report(self):
        return self.rewrite_info.report

    def kernels(self):
        """The Triton source behind each rewrite op of the graph, with what it computes
        (a list of ``rewrite.kernel_listing.KernelListing``)."""
        from rewrite.kernel_listing import kernel_listings

        return kernel_listings(self.graph)

    @property
    def example_inputs(self) -> tuple[tuple, dict]:
        return self.rewrite_info.example_args, self.rewrite_info.example_kwargs

    def __call__(self, *args, **kwargs):
        # A training schedule (remat) runs training calls as its own forward/backward graphs;
        # other calls (inference, export, torch.compile) run this graph.
        step = self.meta.get(TRAINING_STEP)
        if step is not None and self.training and step.applies(self, args, kwargs):
            return step(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    def train(self, mode: bool = True):
        info = self.rewrite_info
        wanted = "train" if mode else "eval"
        if wanted != info.mode and info.fixed_mode:
            raise RewriteError(
                f"cannot switch the rewritten {info.model_name} to {wanted} mode: it was captured in {info.mode} mode, "
                f"and {info.fixed_mode}, which switching its dropout and batch norm cannot give. "
                f"Rewrite the model in {wanted} mode for that: optimize(model, ..., mode={wanted!r})"
            )
        set_graph_mode(self, mode)
        return super().train(mode)
