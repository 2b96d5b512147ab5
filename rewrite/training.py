"""One training loop for the passes that learn (relu_reduce, linearize_attention): a student
learns to match a teacher (the original model's outputs, or chosen intermediate values) on
the user's batches. Labels are optional everywhere: the teacher is the target.

    result = distill(student, teacher, data, trainable=new_params, steps=200, lr=1e-3)
    result.losses        # the loss curve, one value a step (the pass keeps it in its report)

Batches come as users have them: a ``DataLoader`` (or any re-iterable) of ``(inputs, target)``
pairs or of bare inputs; ``split_batch`` tells which from the number of inputs the model
takes. Progress is a ``tqdm`` bar on stderr (``progress=False`` silences it). A run is
deterministic under its ``seed``: the random state is set for the run and put back after.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm import tqdm

from rewrite.errors import OptionError
from rewrite.state import random_state_kept

Batch = tuple[tuple, Any]  # (the model's positional inputs, the target or None)


def split_batch(batch: Any, num_inputs: int) -> Batch:
    """``(inputs, target)`` of one batch for a model taking ``num_inputs`` positional inputs:
    a tensor is the one input; a sequence of ``num_inputs`` items is the inputs; one item more
    is the inputs and then the target (``TensorDataset(x, y)`` gives ``[x, y]``)."""
    if isinstance(batch, torch.Tensor):
        items = [batch]
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        raise OptionError(
            f"a batch of the data is a {type(batch).__name__}; give tensors, or (inputs..., target) tuples "
            "as a DataLoader over a TensorDataset yields them"
        )
    if len(items) == num_inputs:
        return tuple(items), None
    if len(items) == num_inputs + 1:
        return tuple(items[:num_inputs]), items[num_inputs]
    raise OptionError(
        f"a batch of the data holds {len(items)} items; the model takes {num_inputs} input(s), so give "
        f"{num_inputs} (inputs only) or {num_inputs + 1} (inputs, then the target)"
    )


def activations(gm: fx.GraphModule, nodes: Sequence[str], inputs: tuple) -> dict[str, torch.Tensor]:
    """The values of the nodes named ``nodes`` when ``gm`` runs on ``inputs`` (gradients flow
    through them: a loss on them trains what computes them)."""
    wanted = set(nodes)
    unknown = wanted - {n.name for n in gm.graph.nodes}
    if unknown:
        raise OptionError(f"the graph has no node named {', '.join(sorted(unknown))}")
    values: dict[str, torch.Tensor] = {}

    class Keeping(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in wanted:
                values[node.name] = value
            return value

    Keeping(gm).run(*inputs)
    return values


def mse_of_outputs(student_out: Any, teacher_out: Any) -> torch.Tensor:
    """Mean squared error over the floating-point tensors of two outputs of the same structure."""
    pairs = [
        (s, t)
        for s, t in zip(pytree.tree_leaves(student_out), pytree.tree_leaves(teacher_out))
        if isinstance(s, torch.Tensor) and s.is_floating_point()
    ]
    if not pairs:
        raise OptionError("nothing to distil: the outputs hold no floating-point tensors")
    return sum(torch.nn.functional.mse_loss(s.float(), t.detach().float()) for s, t in pairs) / len(pairs)


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)  # one a step
    steps: int = 0
    stopped_early: str | None = None  # why it stopped before ``steps``, if it did


def distill(
    student: Callable[..., Any],
    teacher: Callable[..., Any],
    data: Iterable,
    *,
    trainable: Sequence[torch.nn.Parameter],
    num_inputs: int = 1,
    loss: Callable[[Any, Any], torch.Tensor] = mse_of_outputs,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    patience: int | None = None,
    tolerance: float = 0.0,
    progress: bool = True,
    description: str = "distilling",
) -> DistillResult:
    """Train ``trainable`` (parameters of ``student``) with Adam for ``steps`` steps, cycling
    through ``data``, so that ``loss(student(*inputs), teacher(*inputs))`` falls. The teacher
    runs without gradients. Stops early when the loss is at most ``tolerance``, or when it has
    not improved for ``patience`` steps. ``student``/``teacher`` may return any structure
    ``loss`` takes (e.g. the values ``activations`` reads)."""
    trainable = list(trainable)
    if not trainable:
        raise OptionError("distill: no trainable parameters given")
    if steps < 1 or not math.isfinite(lr) or lr <= 0:
        raise OptionError(f"distill: steps must be at least 1 and lr a positive number (got steps={steps}, lr={lr})")
    result = DistillResult()
    optimizer = torch.optim.Adam(trainable, lr=lr)
    best, since_best = math.inf, 0
    with random_state_kept(), tqdm(total=steps, desc=description, disable=not progress, leave=False) as bar:
        torch.manual_seed(seed)
        for batch in itertools.islice(_cycle(data), steps):
            inputs, _ = split_batch(batch, num_inputs)
            with torch.no_grad():
                target = teacher(*inputs)
            value = loss(student(*inputs), target)
            if not torch.isfinite(value):
                raise OptionError(f"distill: the loss became {value.item()} at step {result.steps + 1}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            result.losses.append(value.item())
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
            if result.losses[-1] <= tolerance:
                result.stopped_early = f"loss {result.losses[-1]:.3g} reached the tolerance {tolerance:g}"
                break
            best, since_best = (result.losses[-1], 0) if result.losses[-1] < best else (best, since_best + 1)
            if patience is not None and since_best >= patience:
                result.stopped_early = f"no better loss than {best:.3g} for {patience} steps"
                break
    return result


def _cycle(data: Iterable):
    """The batches of ``data`` again and again (it is re-iterable, as a DataLoader is)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise OptionError("distill: the data holds no batches")


def quality(before: Callable[..., Any], after: Callable[..., Any], eval_data: Iterable, num_inputs: int = 1) -> dict:
    """How ``after`` (a rewritten model) does against ``before`` (the original) on ``eval_data``,
    in eval-free plain numbers: with class labels in the batches, the accuracy of both (argmax
    of the first floating-point output over its last dimension); always, the fraction of rows
    where the two predict the same class (``agreement``) and the relative error of the outputs."""
    correct_before = correct_after = agree = rows = 0
    labelled = True
    squared_error = squared_norm = 0.0
    with torch.no_grad(), random_state_kept():
        for index, batch in enumerate(eval_data):
            inputs, target = split_batch(batch, num_inputs)
            torch.manual_seed(index)  # both draw the same dropout masks, where they have the same dropouts
            b = _first_float(before(*inputs))
            torch.manual_seed(index)
            a = _first_float(after(*inputs))
            squared_error += (a.double() - b.double()).pow(2).sum().item()
            squared_norm += b.double().pow(2).sum().item()
            pred_b, pred_a = b.argmax(-1), a.argmax(-1)
            agree += (pred_b == pred_a).sum().item()
            rows += pred_b.numel()
            labelled = labelled and isinstance(target, torch.Tensor) and target.shape == pred_b.shape and not target.is_floating_point()
            if labelled:
                correct_before += (pred_b == target).sum().item()
                correct_after += (pred_a == target).sum().item()
    if rows == 0:
        raise OptionError("eval_data holds no batches")
    figures = {"eval_agreement": agree / rows, "eval_output_rel_error": math.sqrt(squared_error / max(squared_norm, 1e-300))}
    if labelled:
        figures.update(eval_accuracy_before=correct_before / rows, eval_accuracy_after=correct_after / rows)
    return figures


def _first_float(output: Any) -> torch.Tensor:
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise OptionError("the model's output holds no floating-point tensor to measure on eval_data")
