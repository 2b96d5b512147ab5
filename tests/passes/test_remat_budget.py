"""remat's budget: what it bounds (``of``: the activation memory by default, or the whole
step's peak), what a budget no schedule fits is told (the floor and a budget that works when
passed back, as a fraction and as a size, in Python and in a ``-p`` spec) and ``closest``.

The model is a small MLP at batch 64, where the parameter gradients, alive together at the end
of the backward, are most of the step's peak: half of that peak is below what any schedule
needs, half of the activation memory is not.
"""

import copy
import math
import random
import re

import pytest
import torch
import torch.nn as nn

from passes import Remat
from passes.remat.report import suggested_budget
from rewrite import PassError, optimize, zoo
from rewrite.liveness import activation_profile, liveness_profile
from rewrite.pass_infra import parse_pipeline
from rewrite.training_step import TRAINING_STEP

TIME_LIMIT = 5
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return zoo.mlp(in_features=64, hidden=256, depth=4, classes=10).train(), (torch.randn(64, 64),)


def _gradient_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _grads(module: nn.Module, inputs: tuple) -> dict[str, torch.Tensor]:
    """Gradients of a fixed random projection of the output w.r.t. the parameters, by name."""
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    out = module(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return dict(zip(names, torch.autograd.grad((out * weight).sum(), params)))


def _assert_same_gradients(module: nn.Module, model: nn.Module, inputs: tuple) -> None:
    got, want = _grads(module, inputs), _grads(copy.deepcopy(model), inputs)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _suggestions(message: str) -> tuple[str, str]:
    found = re.search(r'budget=([0-9.]+), or budget="([0-9]+B)"', message)
    assert found, f"the error names no budget to use: {message}"
    return found.group(1), found.group(2)


@pytest.fixture(scope="module")
def half():
    """The MLP with remat{budget=0.5} (of activations, the default)."""
    model, inputs = _mlp()
    return model, inputs, optimize(model, [Remat(budget=0.5, time_limit=TIME_LIMIT)], inputs, verify=False)


# --------------------------------------------------------------------------- (a) the meaning


def test_half_of_the_activation_memory_where_the_gradients_dominate_the_peak(half):
    model, inputs, module = half
    figures = module.report["remat"].figures
    assert figures["budget_of"] == "activations" and figures["budget_met"] is True
    before, after = figures["activation_peak_before_bytes"], figures["activation_peak_after_bytes"]
    whole = figures["simulated_peak_before_bytes"]
    print(f"activation peak {before} -> {after}; whole step {whole} -> {figures['simulated_peak_after_bytes']}")
    # the gradients are most of the step's peak: half of it is below them
    assert _gradient_bytes(model) > 0.5 * whole
    assert figures["budget_bytes"] == math.floor(0.5 * before)
    assert after <= figures["budget_bytes"] <= 0.5 * before
    # the figures are the simulation of the graphs planned
    part = next(iter(module.meta[TRAINING_STEP].partitions.values()))
    assert before == max(activation_profile(part.model.fx_graph)) and after == max(activation_profile(part.joint))
    assert whole == part.plain_peak and figures["simulated_peak_after_bytes"] == part.simulated_peak
    # activation memory is the step's memory without the gradients, which stay to the end
    assert whole - before <= _gradient_bytes(model)
    assert part.recomputed
    series = module.report["remat"].result.series
    assert max(series["activation_memory_after"]) == after and series["budget_of"] == "activations"
    _assert_same_gradients(module, model, inputs)


def test_half_of_the_whole_peak_is_refused_naming_the_gradients_and_their_bytes():
    model, inputs = _mlp()
    before = _state(model)
    with pytest.raises(PassError) as caught:
        optimize(model, [Remat(budget=0.5, of="peak", time_limit=TIME_LIMIT)], inputs, verify=False)
    message = str(caught.value)
    assert message.startswith("pass 'remat': no schedule fits the budget")
    assert "of the step's peak" in message
    gradients = _gradient_bytes(model)
    assert re.search(rf"the gradients the backward returns [^;]*\({gradients} B\)", message), message
    assert "the largest working set of one op" in message and "of=\"activations\"" in message
    # the op named is in the graph, with the module it belongs to
    assert re.search(r"working set of one op [^;]*: \w+ \(aten\.\w+ in (the backward of )?body\.\d+\)", message), message
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- (b) suggestions


def test_the_suggested_fraction_rounds_up_to_a_budget_of_at_least_the_smallest():
    rng = random.Random(0)
    cases = [(513, 1000), (1021480, 1150504), (1, 3), (2**31 - 1, 2**31), (999_999, 1_000_000)]
    cases += [(s, p) for p in (rng.randrange(10, 10**10) for _ in range(500)) for s in [rng.randrange(1, p + 1)]]
    for smallest, peak in cases:
        text = suggested_budget(smallest, peak)
        fraction, size = _suggestions(text)
        assert math.floor(float(fraction) * peak) >= smallest, (smallest, peak, fraction)
        assert float(fraction) <= 1 and size == f"{smallest}B"
    assert suggested_budget(1001, 1000) == 'budget="1001B"'  # more than the peak: a size only


@pytest.mark.parametrize("of", [pytest.param("activations", marks=pytest.mark.slow), "peak"])
def test_a_suggested_budget_works_when_passed_back_verbatim(of):
    model, inputs = _mlp()
    with pytest.raises(PassError, match="smallest budget a schedule was found for") as caught:
        optimize(model, [Remat(budget=0.05, of=of, time_limit=3)], inputs, verify=False)
    fraction, size = _suggestions(str(caught.value))
    peaks = []
    for spec in (Remat(budget=float(fraction), of=of, time_limit=TIME_LIMIT), f'remat{{budget={fraction},of={of},time_limit=5}}',
                 Remat(budget=size, of=of, time_limit=TIME_LIMIT), f'remat{{budget="{size}",of={of},time_limit=5}}'):  # fmt: skip
        module = optimize(model, [spec], inputs, verify=False)
        figures = module.report["remat"].figures
        assert figures["budget_met"] and figures["budget_of"] == of
        reached = figures["activation_peak_after_bytes" if of == "activations" else "simulated_peak_after_bytes"]
        assert reached <= figures["budget_bytes"]
        peaks.append(figures["activation_peak_before_bytes" if of == "activations" else "simulated_peak_before_bytes"])
    _assert_same_gradients(module, model, inputs)
    assert math.floor(float(fraction) * peaks[0]) >= int(size[:-1])


def test_a_quoted_value_in_a_pass_spec_reads_as_in_python():
    assert parse_pipeline('remat{budget="123456B",of=peak}') == [Remat(budget="123456B", of="peak")]
    assert parse_pipeline("remat{budget='1.5GB'}") == [Remat(budget="1.5GB")]


# --------------------------------------------------------------------------- (c) closest


def test_closest_plans_the_closest_schedule_and_warns():
    model, inputs = _mlp()
    with pytest.warns(UserWarning, match=r"no schedule fits the budget.*closest=True: planned the closest schedule"):
        module = optimize(model, [Remat(budget=0.5, of="peak", closest=True, time_limit=TIME_LIMIT)], inputs, verify=False)
    figures = module.report["remat"].figures
    whole = figures["simulated_peak_before_bytes"]
    assert figures["budget_met"] is False and figures["budget_bytes"] == math.floor(0.5 * whole)
    assert figures["budget_bytes"] < figures["budget_used_bytes"] == figures["simulated_peak_after_bytes"] < whole
    _assert_same_gradients(module, model, inputs)
    # met budgets are unaffected by it
    module = optimize(model, [Remat(budget=0.9, of="peak", closest=True, time_limit=TIME_LIMIT)], inputs, verify=False)
    assert module.report["remat"].figures["budget_met"] is True


# --------------------------------------------------------------------------- (d) sizes


def test_a_size_bounds_activation_memory_or_the_whole_step(half):
    model, inputs, planned = half
    activations, whole = (planned.report["remat"].figures[k] for k in ("activation_peak_before_bytes", "simulated_peak_before_bytes"))
    size = int(0.6 * activations)
    module = optimize(model, [Remat(budget=f"{size}B", time_limit=TIME_LIMIT)], inputs, verify=False)
    figures = module.report["remat"].figures
    assert figures["budget_bytes"] == size and figures["activation_peak_after_bytes"] <= size
    assert figures["simulated_peak_after_bytes"] > size  # the gradients come on top
    # of the whole step: a size between the gradients' floor and the peak
    size = int(0.95 * whole)
    module = optimize(model, [Remat(budget=f"{size}B", of="peak", time_limit=TIME_LIMIT)], inputs, verify=False)
    figures = module.report["remat"].figures
    assert figures["budget_bytes"] == size and figures["simulated_peak_after_bytes"] <= size
    _assert_same_gradients(module, model, inputs)


class SumOfFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128) for _ in range(6))

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
            features.append(x)
        return sum(features)


def test_inference_has_no_gradients_so_both_meanings_coincide():
    torch.manual_seed(0)
    model = SumOfFeatures().eval()
    x = torch.randn(512, 128)
    figures = {}
    for of in ("activations", "peak"):
        m = optimize(model, [Remat(graph="inference", budget=0.75, of=of, time_limit=TIME_LIMIT)], (x,), mode="eval")
        figures[of] = m.report["remat"].figures
        assert figures[of]["budget_met"] and [n for n in m.graph.nodes if n.name.endswith("_recomputed")]
        assert max(liveness_profile(m.graph)) == max(activation_profile(m.graph)) == figures[of]["simulated_peak_after_bytes"]
    for key in ("budget_bytes", "activation_peak_before_bytes", "simulated_peak_before_bytes"):
        assert figures["activations"][key] == figures["peak"][key]
    assert figures["peak"]["activation_peak_before_bytes"] == figures["peak"]["simulated_peak_before_bytes"]


@pytest.mark.parametrize(
    "stopped, advice",
    [
        ("stalled", "the search stopped closing in on it after 3.5 s; raise the budget, or allow more recomputations "
                    "(intervals=5), or take the closest schedule found (closest=True)"),
        ("time_limit", "was found in 3.5 s: raise time_limit or the budget, or allow more recomputations (intervals=5)"),
    ],
)  # fmt: skip
def test_no_schedule_found_advises_more_time_only_where_the_time_limit_ended_the_search(stopped, advice):
    from passes.remat.report import explain
    from solvers.schedule import Schedule

    schedule = Schedule("unknown", solver="moccasin", budget=130176, stopped=stopped)
    schedule.seconds = 3.5
    message = explain(schedule, 260352, more_intervals=5, of="activations")
    assert message.startswith("no schedule within the budget 127.1 KiB (0.50 of the peak activation memory 254.2 KiB)")
    assert message.endswith(advice)


def test_a_stalled_search_names_the_smallest_budget_a_schedule_was_found_for():
    # HF OPT at 0.5 of its activations: the search stalls 3.4 KiB over, and the schedule it
    # ends with, solved again at its peak, fits 137728 B once written out
    from passes.remat.report import explain
    from solvers.schedule import Schedule

    schedule = Schedule("unknown", solver="moccasin", budget=130176, stopped="stalled")
    schedule.seconds, schedule.smallest_feasible_budget = 3.4, 133632
    message = explain(schedule, 260352, more_intervals=5, of="activations", fits=137728)
    assert 'after 3.4 s; the smallest budget a schedule was found for is 134.5 KiB (budget=0.530, or budget="137728B"); ' \
           "raise the budget" in message, message
