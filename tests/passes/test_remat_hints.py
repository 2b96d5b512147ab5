"""remat's starts (passes/remat/hints.py): PyTorch's min-cut partition and checkpointing every
block, written as retention intervals over the training step's memory model, are valid
schedules; the solver started from them never does worse than the cheaper of them."""

import pytest

from passes.remat import hints
from passes.remat.lower import ScheduledTraining
from rewrite import zoo
from rewrite.capture import capture
from solvers import moccasin
from solvers.schedule import peak_memory, recompute_cost, validate


@pytest.fixture(scope="module")
def vit_step():
    """The memory model of a small ViT's training step (two blocks: blocks.0, blocks.1)."""
    model, inputs = zoo.build("vit", batch=2)
    model.train()
    models = []

    def planner(memory_model):
        models.append(memory_model)
        return memory_model.plain_intervals()

    gm = capture(model, inputs, mode="train", dynamic_batch=False).graph_module
    ScheduledTraining(planner).prepare(gm, inputs, {})
    return models[-1]


def test_starts_are_valid_schedules_that_recompute_in_the_backward(vit_step):
    model = vit_step
    starts = hints.training_starts(model)
    assert hints.CHECKPOINT in starts
    assert any(name.startswith("min-cut") for name in starts)
    boundary = hints._forward_end(model)
    activations = model.activation_graph()  # the pass's default budget: gradients count nothing
    plain = peak_memory(activations, model.order, model.plain_intervals())
    for name, intervals in starts.items():
        validate(model.graph, model.order, intervals, keep=model.keep)
        assert all(len(spans) <= 2 for spans in intervals.values()), name
        for spans in intervals.values():
            if len(spans) == 2:  # recomputed in the backward, at least two steps after the first interval
                assert spans[1][0] >= boundary and spans[1][0] >= spans[0][1] + 2, name
    checkpoint = starts[hints.CHECKPOINT]
    assert recompute_cost(model.graph, checkpoint) > 0
    assert peak_memory(activations, model.order, checkpoint) < plain
    # the blocks' insides are recomputed, their outputs (the residual stream) are not
    recomputed = {name for name, spans in checkpoint.items() if len(spans) == 2}
    blocks = {u.name: hints._block(u.node) for u in model.units}
    assert recomputed and all(blocks[name] in ("blocks.0", "blocks.1") for name in recomputed)


def test_an_empty_saved_set_recomputes_chains_with_inputs_alive(vit_step):
    # nothing saved: every forward tensor the backward reads is recomputed, its inputs
    # recomputed before it (at the same time or earlier) where they are not kept
    model = vit_step
    boundary = hints._forward_end(model)
    intervals = hints.intervals_from_saved(model, boundary, set())
    validate(model.graph, model.order, intervals, keep=model.keep)
    assert sum(len(spans) - 1 for spans in intervals.values()) > 10


def test_no_starts_for_a_forward_graph(vit_step):
    model = vit_step
    forward_only = hints.intervals_from_saved(model, len(model.order), set())
    assert forward_only == model.plain_intervals()


def test_ours_costs_no_more_than_the_cheaper_start_both_meet(vit_step):
    model = vit_step
    graph, order = model.activation_graph(), model.order
    starts = hints.training_starts(model)
    checkpoint = starts[hints.CHECKPOINT]
    min_cut = min((s for n, s in starts.items() if n.startswith("min-cut")), key=lambda s: peak_memory(graph, order, s))
    budget = max(peak_memory(graph, order, checkpoint), peak_memory(graph, order, min_cut))
    assert budget < peak_memory(graph, order, model.plain_intervals())
    result = moccasin.solve(graph, order, budget, keep=model.keep, time_limit=10, workers=2, starts=starts)
    assert result.has_schedule
    validate(graph, order, result.intervals, budget, keep=model.keep)
    cheaper = min(recompute_cost(graph, checkpoint), recompute_cost(graph, min_cut))
    assert result.objective <= cheaper
    assert result.phase_one in result.start_costs and hints.CHECKPOINT in result.start_costs


def test_min_cut_settings_stop_at_the_first_start_over_the_budget(vit_step, monkeypatch):
    # a start must fit the budget, and a higher setting saves more: with ``fits`` the settings
    # are partitioned from the lowest up and none after the first whose schedule does not fit
    from torch._functorch import partitioners

    model = vit_step
    partition = partitioners.min_cut_rematerialization_partition
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return partition(*args, **kwargs)

    monkeypatch.setattr(partitioners, "min_cut_rematerialization_partition", counted)
    assert not any(name.startswith("min-cut") for name in hints.training_starts(model, fits=lambda spans: False))
    assert len(calls) == 1
    calls.clear()
    every = hints.training_starts(model, fits=lambda spans: True)
    assert [n for n in every if n.startswith("min-cut")] == [f"min-cut {s:g}" for s in sorted(hints.MIN_CUT_SETTINGS)]
    assert len(calls) == len(hints.MIN_CUT_SETTINGS)
    # a budget between two settings' peaks: those at or below it are kept, the one above it ends the search
    graph, order = model.activation_graph(), model.order
    peaks = {n: peak_memory(graph, order, s) for n, s in every.items() if n.startswith("min-cut")}
    lowest = f"min-cut {min(hints.MIN_CUT_SETTINGS):g}"
    budget = peaks[lowest]
    calls.clear()
    some = hints.training_starts(model, fits=lambda spans: peak_memory(graph, order, spans) <= budget)
    kept = [n for n in some if n.startswith("min-cut")]
    assert kept[0] == lowest and all(peaks[n] <= budget for n in kept)
    assert len(calls) == min(len(kept) + 1, len(hints.MIN_CUT_SETTINGS))
