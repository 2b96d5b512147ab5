"""The module ``optimize`` returns: a GraphModule that is called like the original model,
trains, switches between train and eval, and carries ``before``, ``after`` and ``report``."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

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
    return clone


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


def set_graph_mode(gm: fx.GraphModule, training: bool) -> bool:
    """Flip the train/eval flags recorded in the graph (dropout, batch norm with running
    statistics, the batch counter); True when anything changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = _MODE_FLAG_ARG.get(node.target)
        if index is not None and len(node.args) > index:
            if node.target is aten.batch_norm.default and node.args[3] is None:
                continue  # no running statistics: batch statistics in both modes
            if node.args[index] != training:
                node.update_arg(index, training)
                changed = True
        elif _is_batch_counter_increment(node):
            increment = 1 if training else 0
            if node.args[1] != increment:
                node.update_arg(1, increment)
                changed = True
    if changed:
        gm.recompile()
    return changed


@dataclass
class RewriteInfo:
    before: fx.GraphModule | None
    report: Any
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any


class RewrittenModule(fx.GraphModule):
    """A rewritten model. Call it like the original; ``.train()`` / ``.eval()`` switch the
    mode-dependent ops torch.export recorded (dropout, batch norm); branches of the model's
    Python on ``self.training`` were fixed when it was captured.

    ``before``: the captured graph; ``after``: this graph; ``report``: what the passes did.
    """

    def __init__(self, graph_module: fx.GraphModule, info: RewriteInfo):
        super().__init__(graph_module, _copy_graph(graph_module.graph), class_name="RewrittenModule")
        self.meta = dict(getattr(graph_module, "meta", {}))
        self.rewrite_info = info
        self.training = self._graph_training()

    def _graph_training(self) -> bool:
        for node in self.graph.nodes:
            index = _MODE_FLAG_ARG.get(node.target)
            if index is not None and len(node.args) > index and not (node.target is aten.batch_norm.default and node.args[3] is None):
                return bool(node.args[index])
        # No mode-dependent op: the mode it was captured in (a saved report is a dict).
        report = self.rewrite_info.report
        mode = report.get("mode") if isinstance(report, dict) else getattr(report, "mode", None)
        return mode == "train" if mode in ("train", "eval") else self.training

    @property
    def before(self) -> fx.GraphModule | None:
        return self.rewrite_info.before

    @property
    def after(self) -> fx.GraphModule:
        return self

    @property
    def report(self):
        return self.rewrite_info.report

    @property
    def example_inputs(self) -> tuple[tuple, dict]:
        return self.rewrite_info.example_args, self.rewrite_info.example_kwargs

    def train(self, mode: bool = True):
        set_graph_mode(self, mode)
        return super().train(mode)
