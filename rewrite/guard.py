"""A quality guard for approximate passes: keep the fewest approximations exact that bring
the whole model's gradient back to a given cosine.

An approximation that is harmless alone can compound with depth (approx_bp's step
derivatives: 49 SiLUs can leave a gradient cosine near 0.1). The guard measures the whole
rewrite against the graph before on the example inputs, with ``rewrite.verify.compare`` (the
final check's random projection). Where the cosine falls short, the pass ranks what it
approximated (worst first, by a figure of its own), and a bisection, each step measured, finds
how few of the worst must stay exact::

    def rewrite(gm, kept):                    # rewrite gm in place, leaving the nodes in kept
        return [c.node for c in RULES.leaving(kept).apply(gm).changes]

    guarded = keep_fewest_exact(original, rewrite, rank, args, kwargs, min_cosine=0.9,
                                ranked_by="error per byte saved")
    guarded.kept                              # node name -> why it stays exact (a Skip reason)

It costs about log2(n) + 1 comparisons (each a forward and backward of both graphs) plus
what ``rank`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from rewrite.module import clone_graph_module
from rewrite.verify import compare


@dataclass(frozen=True)
class Ranked:
    """One approximated node: ``score`` orders them (the largest stays exact first), ``detail``
    says what it measured, in words."""

    name: str
    score: float
    detail: str = ""


@dataclass
class Guarded:
    kept: dict[str, str] = field(default_factory=dict)  # node name -> why it stays exact
    before: float | None = None  # gradient cosine with everything approximated (None: not measured)
    after: float | None = None  # with the guard's choice kept exact


def keep_fewest_exact(
    original: fx.GraphModule,
    rewrite: Callable[[fx.GraphModule, Mapping[str, str]], Sequence[str]],
    rank: Callable[[Sequence[str]], Sequence[Ranked]],
    args: tuple,
    kwargs: dict,
    *,
    min_cosine: float,
    ranked_by: str,
) -> Guarded:
    """Which nodes ``rewrite`` approximates must stay exact for the whole-model gradient cosine
    against ``original`` to reach ``min_cosine``. ``rewrite(gm, kept)`` rewrites a copy of
    ``original`` in place, leaving the nodes named in ``kept`` as they are, and returns the
    names of the nodes it approximated; ``rank(names)`` scores those (``ranked_by`` names the
    score in the reasons). ``original`` is not changed."""

    def cosine_with(kept: Mapping[str, str]) -> tuple[float | None, Sequence[str]]:
        trial = clone_graph_module(original)
        approximated = rewrite(trial, kept)
        return compare(original, trial, args, kwargs).grad_cosine, approximated

    before, approximated = cosine_with({})
    if not approximated or before is None or before >= min_cosine:
        return Guarded({}, before, before)
    ranked = sorted(rank(approximated), key=lambda r: -r.score)
    cosines = {0: before}  # how many of the worst stay exact -> gradient cosine

    def cosine(k: int) -> float:
        if k not in cosines:
            cosines[k] = cosine_with(dict.fromkeys(r.name for r in ranked[:k]))[0] or 0.0
        return cosines[k]

    low, high = 0, len(ranked)  # below min_cosine with `low` kept exact; every one exact meets it
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cosine(middle) >= min_cosine else (middle, high)
    fewer = f"with the {low} worst kept exact" if low else "with all approximated"
    measured = f"{fewer} the gradient cosine is {cosines[low]:.3g} < min_cosine {min_cosine:g}, with {high} kept exact it is {cosine(high):.3g}"
    kept = {
        r.name: f"kept exact backward: {measured}; it has the {ordinal(place)} largest {ranked_by} of the {len(ranked)} "
        f"approximated" + (f" ({r.detail})" if r.detail else "")
        for place, r in enumerate(ranked[:high], 1)
    }
    return Guarded(kept, before, cosines[high])


def derivative_error(exact: Callable, approximate: Callable, x: torch.Tensor, from_above: torch.Tensor | None) -> float:
    """The relative error the backward of ``approximate`` puts into the gradient at ``x``
    against the backward of ``exact`` (both functions of x), under the gradient ``from_above``
    their output receives (0 when none reaches it)."""
    if from_above is None:
        return 0.0
    x = x.detach().requires_grad_()
    want = torch.autograd.grad(exact(x), x, from_above)[0].double()
    got = torch.autograd.grad(approximate(x), x, from_above)[0].double()
    return ((want - got).norm() / want.norm().clamp_min(1e-300)).item()


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
