"""Hugging Face models from small configs: the report gives activation memory against the
user's eager model as well as against the captured graph (for sdpa models the graph saves
more than the eager model: repeated K/V heads, a materialised mask), and train/eval switch
where the eval graph is the train graph with dropout off, and are refused where the model's
Python makes them differ."""

import pytest
import torch

import rewrite
from rewrite import optimize
from rewrite.html_report import render_html
from rewrite.report import format_change

transformers = pytest.importorskip("transformers")


def saved_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``model``, its parameters
    and buffers left out, measured here with saved_tensors_hooks."""
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs)
    return sum(saved.values())


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = _ids()
    return model, ids, optimize(model, passes=["approx_bp"], example_inputs=(ids,))


def gpt2(attn_implementation: str, **config):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn_implementation, use_cache=False, **config,
    )).train()


@pytest.fixture(scope="module")
def gpt2_eager():
    model, ids = gpt2("eager"), _ids()
    return model, ids, optimize(model, passes=["approx_bp"], example_inputs=(ids,))


@pytest.mark.parametrize("name", ["llama", "gpt2_eager"])
def test_activation_memory_is_reported_against_the_eager_model(name, request):
    model, ids, m = request.getfixturevalue(name)
    report = m.report
    eager = saved_bytes(model, ids)
    assert report.eager_activation_bytes == eager
    assert report.to_dict()["activation_bytes_eager"] == eager
    before, after = report["approx_bp"].activation_bytes
    assert f"    against the eager model: {format_change(eager, after)}" in str(report)
    page = render_html(report)
    assert "activation memory (against the eager model)" in page
    assert f"{(after - eager) / eager:+.1%}" in page
    if name == "llama":  # sdpa: the captured graph saves more than the model itself
        assert before > eager


@pytest.mark.parametrize("name", ["llama", "gpt2_eager"])
def test_a_model_whose_eval_graph_is_its_train_graph_with_dropout_off_switches(name, request):
    model, ids, m = request.getfixturevalue(name)
    assert m.report.fixed_mode is None and m.training
    try:
        m.eval()
        model.eval()
        torch.testing.assert_close(m(ids).logits, model(ids).logits)
    finally:
        m.train()
        model.train()


def test_gpt2_sdpa_with_attention_dropout_refuses_eval():
    # GPT-2 passes its attention dropout to sdpa as a number, 0 in eval mode: no flag can switch it.
    m = optimize(gpt2("sdpa", attn_pdrop=0.1), [], (_ids(),), verify=False)
    assert m.report.fixed_mode.startswith(
        "in eval mode its Python computes another graph (first difference at node scaled_dot_product_attention in transformer.h.0.attn"
    )
    with pytest.raises(rewrite.RewriteError, match="mode='eval'"):
        m.eval()


def test_a_rewritten_hugging_face_decoder_saves_and_loads(llama, tmp_path):
    """Its graph calls aten.__and__ (the causal mask): the .pt2 reader must take the ops torch writes."""
    model, ids, rewritten = llama
    path = rewrite.save(rewritten, tmp_path / "llama.pt2")
    loaded = rewrite.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rewritten(ids).logits)


@pytest.mark.slow
def test_t5_whose_output_holds_several_tensors_is_rewritten_and_checked():
    config = transformers.T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128, use_cache=False,
        dropout_rate=0.0, feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).train()
    ids = _ids()
    rewritten = optimize(model, ["approx_bp"], (ids,), {"decoder_input_ids": ids})
    (entry,) = rewritten.report.passes
    assert entry.changes, "approx_bp found nothing to rewrite in T5's gated GELU"
    assert entry.numerics.grad_untested is None and entry.numerics.forward_within_rounding
    with torch.no_grad():
        out, expected = rewritten(ids, decoder_input_ids=ids), model(ids, decoder_input_ids=ids)
    assert torch.allclose(out.logits, expected.logits, atol=1e-5)


@pytest.mark.parametrize("build", ["t5", "mistral"])
def test_a_model_that_returns_its_key_value_cache_is_told_to_turn_it_off(build):
    # T5 returns an EncoderDecoderCache, the decoders a DynamicCache: both named, with the fix
    from rewrite.errors import CaptureError

    torch.manual_seed(0)
    ids = _ids()
    if build == "t5":
        config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=128)
        model, kwargs = transformers.T5ForConditionalGeneration(config).train(), {"decoder_input_ids": ids}
    else:
        config = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=128)  # fmt: skip
        model, kwargs = transformers.MistralForCausalLM(config).train(), {}
    with pytest.raises(CaptureError, match="returns its key/value cache .*use_cache=False"):
        optimize(model, ["approx_bp"], (ids,), kwargs)
    rewritten = optimize(model, ["approx_bp"], (ids,), {**kwargs, "use_cache": False})
    assert rewritten.report.passes[0].changes
