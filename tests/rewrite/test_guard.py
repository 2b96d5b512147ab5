"""The quality guard: the fewest approximations kept exact that bring the whole-model gradient
cosine to the threshold, found by bisection and checked here against the measurement itself;
the relative error of a substitute derivative; ordinals in the reasons."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewrite.capture import capture
from rewrite.graph import replace_by_example
from rewrite.guard import Ranked, derivative_error, keep_fewest_exact, ordinal
from rewrite.module import clone_graph_module
from rewrite.pattern import Rule, Rules, op, var
from rewrite.verify import compare

aten = torch.ops.aten


class Residual(nn.Module):
    """x + tanh(W x), eight times: each block's branch adds to the gradient."""

    def __init__(self, width=8, depth=8):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for fc in self.fcs:
            x = x + torch.tanh(fc(x))
        return x


def _no_backward(t):
    """tanh forward, no gradient through it: a crude approximation whose error is easy to see."""
    return torch.tanh(t).detach() + (t - t.detach()) * 0


APPROXIMATE = Rules(Rule(op(aten.tanh.default, var("x")), lambda m: replace_by_example(m, _no_backward, m["x"])))


def _rewrite(gm, kept):
    return [c.node for c in APPROXIMATE.leaving(kept).apply(gm).changes]


def _setup():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    return capture(Residual(), (x,)).graph_module, x


def _cosine(original, x, kept_names):
    trial = clone_graph_module(original)
    _rewrite(trial, dict.fromkeys(kept_names))
    return compare(original, trial, (x,), {}).grad_cosine


def test_the_fewest_kept_exact_reach_the_threshold_and_one_fewer_does_not():
    gm, x = _setup()
    # Rank: later blocks first (a score of the pass's own; any order works, the bisection measures).
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    rank = lambda names: [Ranked(n, float(order[n]), f"position {order[n]}") for n in names]  # noqa: E731
    guarded = keep_fewest_exact(gm, _rewrite, rank, (x,), {}, min_cosine=0.8, ranked_by="position")
    assert guarded.before < 0.8 <= guarded.after
    ranked = sorted(rank([n.name for n in gm.graph.nodes if n.target is aten.tanh.default]), key=lambda r: -r.score)
    high = len(guarded.kept)
    assert 0 < high < len(ranked) and list(guarded.kept) == [r.name for r in ranked[:high]]
    assert _cosine(gm, x, list(guarded.kept)) == pytest.approx(guarded.after)
    assert _cosine(gm, x, list(guarded.kept)[:-1]) < 0.8  # one fewer falls short: the fewest
    reason = guarded.kept[ranked[0].name]
    assert reason.startswith("kept exact backward:") and "< min_cosine 0.8" in reason
    assert "the 1st largest position of the 8 approximated (position" in reason
    assert [n.target for n in gm.graph.nodes].count(aten.tanh.default) == 8  # the original is not changed


def test_nothing_is_kept_when_the_threshold_already_holds():
    gm, x = _setup()
    ranked = []
    guarded = keep_fewest_exact(gm, _rewrite, lambda names: ranked.append(names) or [], (x,), {}, min_cosine=0.01, ranked_by="-")
    assert guarded.kept == {} and guarded.before == guarded.after > 0.01
    assert ranked == []  # no ranking run either


def test_derivative_error():
    x = torch.randn(100, dtype=torch.float64)
    g = torch.randn(100, dtype=torch.float64)
    assert derivative_error(F.silu, F.silu, x, g) == 0.0
    assert derivative_error(torch.tanh, _no_backward, x, g) == pytest.approx(1.0)  # nothing of the gradient passes
    assert derivative_error(torch.tanh, torch.tanh, x, None) == 0.0
    assert 0 < derivative_error(F.silu, lambda t: torch.ops.rewrite.resilu2(t)[0], x, g) < 1


@pytest.mark.parametrize("n, text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd"), (111, "111th")])
def test_ordinal(n, text):
    assert ordinal(n) == text
