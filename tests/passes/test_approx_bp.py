"""approx_bp on real model shapes: exact forward, step-derivative backward, memory saved,
every way of writing the ops found, the norms it must leave alone left alone, with reasons."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import ROUNDING, StepDerivativeReference, build, rel_error

import rewrite
from passes import ApproxBP
from rewrite import PassError, optimize, zoo
from rewrite.memory import record_saved

MODELS = ["mlp", "vit", "llama", "cnn"]


def _ops(module) -> list[str]:
    return [str(n.target) for n in module.graph.nodes if n.op == "call_function"]


def _count(module, name: str) -> int:
    return sum(name in t for t in _ops(module))


_COUNTS = ("activations replaced", "norms replaced", "linear layers folded into")


def _counts(report) -> dict:
    """The report's counts of what was replaced (without the quality guard's figures)."""
    return {k: v for k, v in report.figures.items() if k in _COUNTS}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_equals_original(name, mode, dtype):
    model, inputs = build(name, dtype)
    getattr(model, mode)()
    with torch.no_grad():
        expected = model(*inputs)
    rewritten = optimize(model, ["approx_bp"], inputs, mode=mode)
    with torch.no_grad():
        out = rewritten(*inputs)
    assert out.dtype == expected.dtype
    assert rel_error(out, expected) <= ROUNDING[dtype]
    report = rewritten.report["approx_bp"]
    assert report.changes, "nothing was rewritten"
    assert report.numerics.forward_within_rounding


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_equal_the_step_derivative_formula(name, dtype):
    model, inputs = build(name, dtype)
    rewritten = optimize(model, ["approx_bp"], inputs, mode="train")
    float_inputs = [i for i in inputs if i.is_floating_point()]

    def grads(module, reference: bool):
        xs = [i.detach().clone().requires_grad_(True) for i in float_inputs]
        call = [xs.pop(0) if i.is_floating_point() else i for i in inputs]
        leaves = list(call) if float_inputs else []
        leaves = [t for t in leaves if t.requires_grad]
        # Parameters the fold left alone exist in both models under the same name.
        names = [n for n, p in rewritten.named_parameters() if p is dict(model.named_parameters()).get(n)]
        params = dict(module.named_parameters())
        if reference:
            with StepDerivativeReference():
                out = module(*call)
        else:
            out = module(*call)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = (out.double() * weight.double()).sum()
        return torch.autograd.grad(loss, leaves + [params[n] for n in names]), names

    got, names = grads(rewritten, reference=False)
    want, _ = grads(model, reference=True)
    assert len(names) > 0
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    flat_got = torch.cat([g.double().reshape(-1) for g in got])
    flat_want = torch.cat([w.double().reshape(-1) for w in want])
    assert rel_error(flat_got, flat_want) <= tolerance
    scale = flat_want.norm()
    for g, w in zip(got, want):  # also tensor by tensor, relative to the whole gradient's size
        assert (g.double() - w.double()).norm() <= tolerance * max(w.double().norm(), 1e-3 * scale)


def test_exact_gradients_differ_from_approximate_ones():
    # Sanity check of the test above: the step derivative is not the exact derivative.
    model, inputs = build("mlp")
    rewritten = optimize(model, ["approx_bp"], inputs)
    x = inputs[0].clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(model(x).sum(), x)
    x2 = inputs[0].clone().requires_grad_(True)
    (g_approx,) = torch.autograd.grad(rewritten(x2).sum(), x2)
    assert rel_error(g_approx, g_exact) > 1e-3
    assert rewritten.report["approx_bp"].numerics.grad_rel_error > 1e-3


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_activation_memory_saved_for_backward_drops_by_a_quarter(name):
    model, inputs = build(name)
    rewritten = optimize(model, ["approx_bp"], inputs)
    with record_saved(model) as before:
        model(*inputs)
    with record_saved(rewritten) as after:
        rewritten(*inputs)
    assert after.total_bytes <= 0.75 * before.total_bytes
    b, a = rewritten.report["approx_bp"].activation_bytes
    assert (b, a) == (before.total_bytes, after.total_bytes)


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gelu = nn.GELU()
        self.gelu_tanh = nn.GELU(approximate="tanh")
        self.silu = nn.SiLU()
        self.silu_inplace = nn.SiLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        outs = [self.gelu(h), self.gelu_tanh(h), F.gelu(h), F.gelu(h, approximate="tanh"), self.silu(h), F.silu(h)]
        outs.append(self.silu_inplace(self.fc(x)))
        outs.append(F.silu(self.fc(x), inplace=True))
        return torch.stack(outs)


def test_every_spelling_of_gelu_and_silu_is_replaced():
    model = Activations()
    x = torch.randn(4, 8)
    rewritten = optimize(model, [ApproxBP(min_cosine=0)], (x,))  # about matching: the guard is tested below
    assert _count(rewritten, "aten.gelu") == 0 and _count(rewritten, "aten.silu") == 0
    assert _count(rewritten, "rewrite.regelu2") == 4 and _count(rewritten, "rewrite.resilu2") == 4
    torch.testing.assert_close(rewritten(x), model(x))


def test_in_place_activation_whose_input_is_read_later_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc(x)
            y = h.clone()
            F.silu(y, inplace=True)
            return y + h

    m = M()
    x = torch.randn(2, 8)
    rewritten = optimize(m, ["approx_bp"], (x,))
    torch.testing.assert_close(rewritten(x), m(x))


class HandWrittenNorms(nn.Module):
    """LLaMA RMSNorm, T5 RMSNorm (cast only for the variance), x / sqrt form, nn.RMSNorm,
    F.rms_norm, nn.LayerNorm, F.layer_norm without affine: each feeding linear layers."""

    def __init__(self, d=16):
        super().__init__()
        self.llama = zoo.RMSNorm(d)
        self.t5_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.div_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.rms = nn.RMSNorm(d, eps=1e-5)
        self.ln = nn.LayerNorm(d)
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(8))
        with torch.no_grad():
            self.llama.weight.uniform_(0.5, 1.5)
            self.rms.weight.uniform_(0.5, 1.5)
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-1, 1)

    def forward(self, x):
        out = self.fcs[0](self.llama(x))
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        out = out + self.fcs[1](self.t5_weight * (x * torch.rsqrt(variance + 1e-6)))
        out = out + self.fcs[2](self.div_weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
        out = out + self.fcs[3](self.rms(x)) + self.fcs[4](F.rms_norm(x, (16,)))
        out = out + self.fcs[5](self.ln(x)) + self.fcs[6](F.layer_norm(x, (16,)))
        return out


def test_every_spelling_of_the_norms_is_replaced():
    model = HandWrittenNorms()
    x = torch.randn(3, 5, 16)
    rewritten = optimize(model, ["approx_bp"], (x,))
    report = rewritten.report["approx_bp"]
    assert not report.skipped, report.skipped
    assert _count(rewritten, "rewrite.ms_rms_norm") == 5
    assert _count(rewritten, "rewrite.ms_layer_norm") == 2
    assert _count(rewritten, "aten.rsqrt") == 0 and _count(rewritten, "aten.sqrt") == 0 and _count(rewritten, "aten.pow") == 0
    assert rel_error(rewritten(x), model(x)) < 1e-5
    names = {n for n, _ in rewritten.named_parameters()}
    assert not names & {"llama.weight", "t5_weight", "div_weight", "rms.weight", "ln.weight", "ln.bias"}


def test_fold_is_done_in_float64_and_leaves_the_user_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 7, bias=False))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-1, 1)
    original = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 12)
    rewritten = optimize(model, ["approx_bp"], (x,))
    gamma, beta, w = (t.double() for t in (model[0].weight, model[0].bias, model[1].weight))
    params = dict(rewritten.named_parameters())
    assert set(params) == {"1.weight", "1.bias"}  # the linear gained a bias for beta
    torch.testing.assert_close(params["1.weight"], (w * gamma).float())
    torch.testing.assert_close(params["1.bias"], (w @ beta).float())
    assert params["1.weight"].requires_grad and params["1.bias"].requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])


class LeftAlone(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm_dropout = nn.LayerNorm(d)
        self.drop = nn.Dropout(0.5)
        self.norm_gelu = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d)
        self.norm_multi = nn.LayerNorm([4, d])
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        a = self.fc(self.drop(self.norm_dropout(x)))
        b = self.fc(F.gelu(self.norm_gelu(x)))
        c = self.fc(self.norm_multi(x))
        return a + b + c, self.norm_out(x)


def test_norms_that_cannot_share_memory_are_left_alone_with_reasons():
    x = torch.randn(2, 4, 8)
    rewritten = optimize(LeftAlone(), ["approx_bp"], (x,), mode="eval")
    reasons = {s.where: s.reason for s in rewritten.report["approx_bp"].skipped}
    assert "dropout" in reasons["norm_dropout"]
    assert "not only by linear layers" in reasons["norm_gelu"]
    assert "output of the model" in reasons["norm_out"]
    assert "2 dimensions" in reasons["norm_multi"]
    assert _count(rewritten, "aten.layer_norm") == 4


def test_tied_or_frozen_linears_are_not_folded_into():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 8, bias=False)
            self.other = nn.Linear(8, 8, bias=False)
            self.other.weight = self.head.weight  # tied

        def forward(self, x):
            return self.head(self.norm(x)) + self.other(x)

    x = torch.randn(2, 8)
    tied = optimize(Tied(), ["approx_bp"], (x,)).report["approx_bp"]
    assert tied.skipped and "shared" in tied.skipped[0].reason

    frozen = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    frozen[1].weight.requires_grad_(False)
    report = optimize(frozen, ["approx_bp"], (x,)).report["approx_bp"]
    assert report.skipped and "frozen" in report.skipped[0].reason


def test_options_turn_parts_off():
    model, inputs = build("vit")
    only_norms = optimize(model, [ApproxBP(gelu=False, silu=False)], inputs)
    assert _count(only_norms, "aten.gelu") == 2 and _count(only_norms, "ms_layer_norm") == 4
    report = only_norms.report["approx_bp"]
    assert report.kind() == "exact" and report.numerics.backward_within_rounding
    no_norms = optimize(model, ["approx_bp{norms=false}"], inputs)
    assert _count(no_norms, "aten.layer_norm") == 5 and _count(no_norms, "regelu2") == 2
    with pytest.raises(PassError, match="nothing to do"):
        optimize(model, [ApproxBP(gelu=False, silu=False, norms=False)], inputs)


def test_second_run_changes_nothing():
    model, inputs = build("llama")
    once = optimize(model, ["approx_bp"], inputs)
    twice = optimize(once, ["approx_bp"], inputs)
    assert twice.report["approx_bp"].changes == []
    torch.testing.assert_close(twice(*inputs), once(*inputs))


def test_report_states_what_it_measured():
    model, inputs = build("llama")
    rewritten = optimize(model, ["approx_bp"], inputs)
    report = rewritten.report["approx_bp"]
    assert report.kind() == "exact forward, approximate backward"
    assert 0 < report.numerics.grad_rel_error < 1 and 0 < report.numerics.grad_cosine <= 1
    assert _counts(report) == {"activations replaced": 2, "norms replaced": 5, "linear layers folded into": 11}
    # The quality guard measured what the final check measures, and kept nothing exact.
    assert report.figures["gradient_cosine"] == report.figures["gradient_cosine_before_guard"] == report.numerics.grad_cosine
    assert report.figures["activations kept exact"] == 0
    text = str(rewritten.report)
    assert "gradients: relative error" in text and "activation memory saved for backward" in text
    assert "final" not in text
    assert any(c.where == "layers.0.mlp" and c.after == "rewrite.resilu2" for c in report.changes)
    assert rewrite.Report is type(rewritten.report)


class SliceInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        F.silu(h[:, :4], inplace=True)  # mutates h through a view
        return self.out(h)


class ViewThenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        v = h.view(-1)
        F.silu(h, inplace=True)  # v sees the mutation
        return v * 2


@pytest.mark.parametrize("model_class", [SliceInPlace, ViewThenInPlace])
@pytest.mark.parametrize("verify", [True, False])
def test_in_place_activation_of_aliased_memory_is_left_alone(model_class, verify):
    model, x = model_class(), torch.randn(4, 8)
    rewritten = optimize(model, ["approx_bp"], (x,), verify=verify)
    report = rewritten.report["approx_bp"]
    assert not report.changes and "shares memory" in report.skipped[0].reason
    torch.testing.assert_close(rewritten(x), model(x))


def test_activation_and_in_place_activation_of_one_tensor():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc(x)
            a = F.gelu(h)
            return a + F.silu(h, inplace=True)

    model, x = M(), torch.randn(4, 8)
    rewritten = optimize(model, [ApproxBP(min_cosine=0)], (x,))  # about the in-place rewrite: the guard is tested below
    assert [c.after for c in rewritten.report["approx_bp"].changes] == ["rewrite.regelu2", "rewrite.resilu2"]
    torch.testing.assert_close(rewritten(x), model(x))
    guarded = optimize(model, ["approx_bp"], (x,))  # the guard trips here: an in-place one kept exact is still right
    torch.testing.assert_close(guarded(x), model(x))


class ScaledRMS(nn.Module):
    def __init__(self, weight_shape):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(weight_shape) + 0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc(self.weight * x)


@pytest.mark.parametrize("shape", [(8,), (1,), (1, 1, 8)])
def test_hand_written_rms_norm_weights_of_any_broadcast_shape_fold(shape):
    model, x = ScaledRMS(shape), torch.randn(2, 3, 8)
    rewritten = optimize(model, ["approx_bp"], (x,))
    assert _count(rewritten, "ms_rms_norm") == 1
    assert rel_error(rewritten(x), model(x)) < 1e-5


def test_a_weight_per_position_is_not_folded():
    model, x = ScaledRMS((3, 8)), torch.randn(2, 3, 8)
    rewritten = optimize(model, ["approx_bp"], (x,))
    (skip,) = rewritten.report["approx_bp"].skipped
    assert "not one value per feature" in skip.reason
    torch.testing.assert_close(rewritten(x), model(x))


def test_a_norm_computed_in_lower_precision_than_its_input_is_left_alone():
    model, inputs = build("llama", torch.float64)
    rewritten = optimize(model, ["approx_bp"], inputs)
    report = rewritten.report["approx_bp"]
    assert len(report.skipped) == 5 and all("computes in torch.float32" in s.reason for s in report.skipped)
    assert report.numerics.forward_within_rounding


def test_under_autocast_the_norms_still_share_memory_with_the_linear_layers():
    model, inputs = build("vit")
    rewritten = optimize(model, ["approx_bp"], inputs)
    norms_only = optimize(model, ["approx_bp{gelu=false}"], inputs)
    saved = {}
    for name, module in (("baseline", model), ("approx_bp", rewritten), ("norms", norms_only)):
        with torch.autocast("cpu", dtype=torch.bfloat16), record_saved(module) as record:
            out = module(*inputs)
        saved[name] = record.total_bytes
        assert out.dtype == torch.bfloat16
    assert saved["norms"] < 0.9 * saved["baseline"]  # the norms alone save memory under AMP
    assert saved["approx_bp"] <= 0.8 * saved["baseline"]  # (bf16 copies of the weights count here too)


def test_folding_keeps_what_trains():
    # A frozen norm folded into a trainable linear without bias: the new bias is frozen like beta.
    frozen = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4, bias=False))
    frozen[0].requires_grad_(False)
    x = torch.randn(2, 8)
    params = dict(optimize(frozen, ["approx_bp"], (x,)).named_parameters())
    assert params["1.weight"].requires_grad and not params["1.bias"].requires_grad
    # A trainable beta folded into a frozen bias would freeze it: left alone.
    mixed = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    mixed[1].bias.requires_grad_(False)
    report = optimize(mixed, ["approx_bp"], (x,)).report["approx_bp"]
    assert "bias is frozen" in report.skipped[0].reason
    # Without gamma (bias only) the linear's weight is not replaced: it stays shared with the model.
    class BiasOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(8, bias=True), nn.Linear(8, 4)
            del self.ln.weight
            self.ln.register_parameter("weight", None)

        def forward(self, x):
            return self.fc(self.ln(x))

    model = BiasOnly()
    rewritten = optimize(model, ["approx_bp"], (x,))
    assert dict(rewritten.named_parameters())["fc.weight"] is model.fc.weight
    assert rel_error(rewritten(x), model(x)) < 1e-5


def test_options_given_as_objects_are_checked():
    with pytest.raises(rewrite.OptionError, match="option norms='false' must be bool"):
        ApproxBP(norms="false")


class WrittenOut(nn.Module):
    """GELU and SiLU as Hugging Face's activations write them out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        new_gelu = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        python_tanh = h * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        fast_gelu = 0.5 * h * (1.0 + torch.tanh(h * 0.7978845608 * (1.0 + 0.044715 * h * h)))
        erf_gelu = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        swish = h * torch.sigmoid(h)
        quick_gelu = h * torch.sigmoid(1.702 * h)  # not GELU: left alone
        return torch.stack([new_gelu, python_tanh, fast_gelu, erf_gelu, swish, quick_gelu])


def test_written_out_gelu_and_silu_are_replaced():
    model, x = WrittenOut(), torch.randn(4, 8)
    rewritten = optimize(model, [ApproxBP(min_cosine=0)], (x,))  # about matching: the guard is tested below
    report = rewritten.report["approx_bp"]
    assert _count(rewritten, "rewrite.regelu2") == 4 and _count(rewritten, "rewrite.resilu2") == 1
    assert _count(rewritten, "aten.tanh") == 0 and _count(rewritten, "aten.erf") == 0 and _count(rewritten, "aten.pow") == 0
    assert _count(rewritten, "aten.sigmoid") == 1  # quick GELU's
    assert report.figures["activations replaced"] == 5 and report.numerics.forward_within_rounding
    assert {c.before for c in report.changes} == {
        "0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))", "0.5 * x * (1 + erf(x / sqrt(2)))", "x * sigmoid(x)"
    }
    assert rel_error(rewritten(x), model(x)) < 1e-6


def _hf_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def test_gpt2_written_out_gelu_and_conv1d_norms():
    # Before: nothing (its GELU is written out; its norms feed Conv1D, a view then addmm).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(config).train()
    rewritten = optimize(model, ["approx_bp"], (_hf_ids(),))
    report = rewritten.report["approx_bp"]
    assert _counts(report) == {"activations replaced": 2, "norms replaced": 4, "linear layers folded into": 4}
    assert _count(rewritten, "aten.tanh") == 0 and _count(rewritten, "ms_layer_norm") == 4
    (skip,) = report.skipped  # ln_f feeds the LM head, tied to the embedding
    assert skip.where == "transformer.ln_f" and "shared (tied)" in skip.reason
    assert report.numerics.forward_within_rounding
    names = {n for n, _ in rewritten.named_parameters()}
    assert "transformer.h.0.ln_1.weight" not in names and "transformer.ln_f.weight" in names


def test_gemma_rms_norm_scaled_by_one_plus_weight():
    # Before: its 2 GELUs only (its RMSNorm scales by 1 + weight).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, use_cache=False,
    )  # fmt: skip
    model = transformers.GemmaForCausalLM(config).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)  # Gemma initialises them to 0: make 1 + w differ from 1 and from w
    rewritten = optimize(model, ["approx_bp"], (_hf_ids(),))
    report = rewritten.report["approx_bp"]
    assert _counts(report) == {"activations replaced": 2, "norms replaced": 4, "linear layers folded into": 10}
    assert _count(rewritten, "ms_rms_norm") == 4 and _count(rewritten, "rsqrt") == 1  # model.norm feeds the tied head
    (skip,) = report.skipped
    assert skip.where == "model.norm" and "shared (tied)" in skip.reason
    assert report.numerics.forward_within_rounding
    ids = _hf_ids()
    assert rel_error(rewritten(ids).logits, model(ids).logits) < 1e-5


# -- quality guard (min_cosine) ------------------------------------------------------------


class DeepSiLU(nn.Module):
    """A 30-layer SiLU MLP, normalised before each SiLU (so its inputs sit where the step
    derivative errs most, as after BatchNorm): the error compounds layer after layer."""

    def __init__(self, width=16, depth=30):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))  # feed a SiLU: left alone
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for layer, norm in zip(self.layers, self.norms):
            x = F.silu(norm(layer(x)))
        return self.head(x)


def _deep_silu():
    torch.manual_seed(0)
    return DeepSiLU(), torch.randn(8, 16)


def test_unguarded_deep_silu_network_loses_the_gradient():
    # What the guard is for: without it the gradient cosine falls below 0.9.
    model, x = _deep_silu()
    report = optimize(model, [ApproxBP(min_cosine=0)], (x,)).report["approx_bp"]
    assert report.figures["activations replaced"] == 30 and "gradient_cosine" not in report.figures
    assert report.numerics.grad_cosine < 0.9


@pytest.mark.slow  # kept out of make test's 6 minutes
def test_guard_keeps_the_worst_activations_exact_until_the_gradient_cosine_is_reached():
    model, x = _deep_silu()
    unguarded = optimize(model, [ApproxBP(min_cosine=0)], (x,)).report["approx_bp"]
    report = optimize(model, ["approx_bp"], (x,)).report["approx_bp"]
    figures = report.figures
    assert report.numerics.grad_cosine >= 0.9 and figures["gradient_cosine"] == report.numerics.grad_cosine
    assert figures["gradient_cosine_before_guard"] == unguarded.numerics.grad_cosine < 0.9
    kept = figures["activations kept exact"]
    assert 0 < kept < 30 and figures["activations replaced"] == 30 - kept
    skips = [s for s in report.skipped if s.reason.startswith("kept exact backward")]
    assert len(skips) == kept and all("< min_cosine 0.9" in s.reason and "error per byte" in s.reason for s in skips)
    assert {s.node for s in skips}.isdisjoint(c.node for c in report.changes)
    b, a = report.activation_bytes
    assert a < b and a > unguarded.activation_bytes[1]  # still saves memory, less than unguarded


def test_guard_at_one_keeps_every_activation_exact():
    model, x = _deep_silu()
    report = optimize(model, [ApproxBP(min_cosine=1.0)], (x,)).report["approx_bp"]
    assert report.figures["activations replaced"] == 0 and report.figures["activations kept exact"] == 30
    assert report.numerics.grad_cosine > 1 - 1e-9


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan])
def test_bad_min_cosine_is_refused(value):
    with pytest.raises(rewrite.OptionError, match="min_cosine"):
        ApproxBP(min_cosine=value)
    with pytest.raises(rewrite.OptionError, match="min_cosine"):
        optimize(*_deep_silu()[:1], [f"approx_bp{{min_cosine={value}}}"], (_deep_silu()[1],))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce, self.expand, self.act = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1), nn.SiLU()

    def forward(self, x):
        return x * torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, stride, kernel):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU(),
            SqueezeExcite(mid, max(1, cin // 4)), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class EfficientNetB0Like(nn.Module):
    """EfficientNet-B0's 16 MBConv blocks (expand, channels, repeats, stride, kernel per
    stage), channels a quarter of B0's: 49 SiLUs."""

    STAGES = [(1, 4, 1, 1, 3), (6, 6, 2, 2, 3), (6, 10, 2, 2, 5), (6, 20, 3, 2, 3), (6, 28, 3, 1, 5), (6, 48, 4, 2, 5), (6, 80, 1, 1, 3)]

    def __init__(self, classes=10):
        super().__init__()
        blocks, cin = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU()], 8
        for expand, cout, repeats, stride, kernel in self.STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, stride if i == 0 else 1, kernel))
                cin = cout
        blocks += [nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.SiLU()]
        self.features, self.head = nn.Sequential(*blocks), nn.Linear(320, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.slow
def test_guard_on_an_efficientnet_b0_like_model():
    # Unguarded, its 49 SiLUs leave a gradient cosine of 0.06; guarded, 0.92 with 3 of them
    # approximate (activation memory: 24% saved unguarded, 8% guarded).
    torch.manual_seed(0)
    model, x = EfficientNetB0Like().train(), torch.randn(4, 3, 32, 32)
    report = optimize(model, ["approx_bp"], (x,)).report["approx_bp"]
    figures = report.figures
    assert figures["gradient_cosine_before_guard"] < 0.9 <= report.numerics.grad_cosine == figures["gradient_cosine"]
    kept = figures["activations kept exact"]
    assert 0 < kept < 49 and figures["activations replaced"] == 49 - kept
    b, a = report.activation_bytes
    assert a < b
