"""Graph utilities: sizes and FLOPs from meta["val"] (symbolic batch evaluated at the example),
the networkx view, inserting nodes with metadata and provenance, replacements traced from
plain PyTorch, new parameters, module paths, tied weights, dead-code removal and the short
names and shapes the reports print."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import rewrite
from rewrite.graph import (
    _clean_module_path,
    add_parameter,
    call_function,
    concrete,
    erase_dead,
    fake_mode_of,
    format_shape,
    getitem,
    is_shared_tensor,
    module_path,
    node_bytes,
    node_flops,
    op_name,
    replace_by_example,
    tensor_value,
    to_networkx,
)
from rewrite.pattern import Rule, Rules, op, var

aten = torch.ops.aten
ASSERT_METADATA = aten._assert_tensor_metadata.default


def _export(model, *args):
    return torch.export.export(model, args, strict=False).module()


def _node(gm, target):
    nodes = [n for n in gm.graph.nodes if n.target is target]
    assert len(nodes) == 1, f"expected one {target}, found {[n.name for n in nodes]}"
    return nodes[0]


def _placeholder(gm, name):
    return next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == name)


class Block(nn.Module):
    def __init__(self, k=6, n=10):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(k, n), nn.GELU())
        self._hidden = nn.Linear(n, n)

    def forward(self, x):
        return self._hidden(self.inner(x))


class Net(nn.Module):
    """Nested modules (one of them with a leading underscore) and a top-level op."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(10, 10)])
        self._proj = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return torch.tanh(self.head(self._proj(x)))


@pytest.fixture(scope="module")
def net_capture():
    """Net captured with a dynamic batch, example batch 5."""
    torch.manual_seed(0)
    return rewrite.capture(Net(), (torch.randn(5, 6),), mode="eval")


# -- sizes ---------------------------------------------------------------------------------


def test_node_bytes_of_a_symbolic_batch_is_evaluated_at_the_example(net_capture):
    gm = net_capture.graph_module
    x = _placeholder(gm, "x")
    assert isinstance(x.meta["val"].shape[0], torch.SymInt), "the batch should be captured as dynamic"
    assert node_bytes(x) == 5 * 6 * 4
    first_linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert node_bytes(first_linear) == 5 * 10 * 4
    output = _node(gm, aten.tanh.default)
    assert node_bytes(output) == 5 * 3 * 4


def test_node_bytes_of_parameters_dtypes_tuples_and_non_tensors():
    class Stats(nn.Module):
        def forward(self, x):
            var, mean = torch.var_mean(x.half(), dim=1)
            return var * x.shape[0], mean

    gm = rewrite.capture(Stats(), (torch.randn(4, 8),)).graph_module
    var_mean = _node(gm, aten.var_mean.dim)
    assert node_bytes(var_mean) == 2 * (4 * 2)  # two f16[4] outputs
    sizes = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.SymInt)]
    assert sizes, "the batch size should be a node of its own"
    assert all(node_bytes(n) == 0 for n in sizes)
    asserts = [n for n in gm.graph.nodes if n.target is ASSERT_METADATA]
    assert asserts and all(node_bytes(n) == 0 for n in asserts)
    assert node_bytes(gm.graph.output_node()) == 0
    traced = fx.symbolic_trace(nn.Linear(8, 3))
    assert all(node_bytes(n) == 0 for n in traced.graph.nodes)  # no meta["val"]: nothing known
    linear_gm = _export(nn.Linear(8, 3), torch.randn(2, 8))
    weight = next(n for n in linear_gm.graph.nodes if n.op == "get_attr" and n.target == "weight")
    assert node_bytes(weight) == 3 * 8 * 4


def test_concrete_evaluates_symbols_and_passes_other_values_through(net_capture):
    batch = _placeholder(net_capture.graph_module, "x").meta["val"].shape[0]
    assert concrete(batch) == 5 and isinstance(concrete(batch), int)
    assert concrete(batch * 3 + 1) == 16
    assert concrete(7) == 7 and concrete("a") == "a"


# -- FLOPs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(7, 16, 5), (1, 3, 4)])
def test_linear_flops_are_2mkn(m, k, n):
    gm = _export(nn.Linear(k, n), torch.randn(m, k))
    linear = _node(gm, aten.linear.default)
    assert node_flops(linear) == 2 * m * k * n
    assert node_flops(linear, fake_mode_of(gm)) == 2 * m * k * n


def test_linear_flops_with_a_dynamic_batch_and_leading_dims():
    captured = rewrite.capture(nn.Linear(8, 12), (torch.randn(3, 4, 8),))
    assert captured.dynamic_inputs, "the batch should be captured as dynamic"
    linear = _node(captured.graph_module, aten.linear.default)
    assert node_flops(linear) == 2 * (3 * 4) * 8 * 12


def test_pointwise_getitem_and_non_call_nodes_count_no_flops(net_capture):
    gm = net_capture.graph_module
    assert node_flops(_node(gm, aten.tanh.default)) == 0
    assert node_flops(_placeholder(gm, "x")) == 0
    assert all(node_flops(n) == 0 for n in gm.graph.nodes if n.op in ("get_attr", "output"))
    class Stats(nn.Module):
        def forward(self, x):
            return torch.var_mean(x, dim=0)

    stats = _export(Stats(), torch.randn(2, 4))
    items = [n for n in stats.graph.nodes if n.target is operator.getitem]
    assert len(items) == 2 and all(node_flops(n) == 0 for n in items)


def test_matmul_flops():
    class MatMul(nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b)

    gm = _export(MatMul(), torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert node_flops(_node(gm, aten.bmm.default)) == 2 * 2 * 3 * 4 * 5


# -- networkx view -------------------------------------------------------------------------


def test_to_networkx_vertices_and_edges(net_capture):
    gm = net_capture.graph_module
    g = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    assert set(g.nodes) == {n.name for n in nodes}
    for node in nodes:
        attrs = g.nodes[node.name]
        assert attrs["op"] == node.op
        assert attrs["target"] == str(node.target)
        assert attrs["bytes"] == node_bytes(node)
        expected_flops = node_flops(node) if node.op == "call_function" else 0
        assert attrs["flops"] == expected_flops
    expected_edges = {(i.name, n.name) for n in nodes for i in n.all_input_nodes}
    assert set(g.edges) == expected_edges
    linears = [n for n in nodes if n.target is aten.linear.default]
    assert [g.nodes[n.name]["flops"] for n in linears] == [2 * 5 * 6 * 10] + [2 * 5 * 10 * 10] * 4 + [2 * 5 * 10 * 3]
    first = linears[0]
    assert ("x", first.name) in g.edges
    assert (first.args[1].name, first.name) in g.edges  # the weight's get_attr feeds the linear
    assert (first.name, "x") not in g.edges


# -- inserting nodes -----------------------------------------------------------------------


def test_call_function_fills_meta_val_and_copies_provenance(net_capture):
    gm = rewrite.module.clone_graph_module(net_capture.graph_module)
    graph = gm.graph
    gelu = next(n for n in graph.nodes if n.target is aten.gelu.default)
    with graph.inserting_after(gelu):
        relu = call_function(graph, aten.relu.default, (gelu,), like=gelu, name="my_relu")
    with graph.inserting_after(relu):
        scaled = call_function(graph, aten.mul.Tensor, (relu, 2.0), name="my_relu")
    assert relu.name == "my_relu" and scaled.name != "my_relu" and scaled.name.startswith("my_relu")
    val = relu.meta["val"]
    assert isinstance(val, torch.Tensor)
    assert val.dtype == gelu.meta["val"].dtype and val.shape == gelu.meta["val"].shape
    assert isinstance(val.shape[0], torch.SymInt)  # symbolic batch kept
    assert fake_mode_of(gm) is not None and val.fake_mode is fake_mode_of(gm)
    assert relu.meta["nn_module_stack"] == gelu.meta["nn_module_stack"]
    assert module_path(relu) == module_path(gelu) == "blocks.0.inner.1"
    assert "nn_module_stack" not in scaled.meta  # no `like`: no provenance invented
    assert node_bytes(scaled) == 5 * 10 * 4
    # the graph is still valid and runs
    user = next(iter(u for u in gelu.users if u not in (relu,)))
    user.replace_input_with(gelu, scaled)
    graph.lint()
    gm.recompile()
    x = torch.randn(2, 6)
    assert gm(x).shape == (2, 3)


def test_call_function_failure_leaves_the_graph_unchanged():
    gm = _export(nn.Linear(4, 3), torch.randn(2, 4))
    graph = gm.graph
    linear = _node(gm, aten.linear.default)
    before = [n.name for n in graph.nodes]
    with graph.inserting_after(linear):
        with pytest.raises(ValueError, match="fake tensors"):
            call_function(graph, aten.zeros.default, ([2, 2],))
    bare = graph.placeholder("bare")  # a node without meta["val"]
    with graph.inserting_after(linear):
        with pytest.raises(ValueError, match="bare"):
            call_function(graph, aten.add.Tensor, (linear, bare))
    graph.erase_node(bare)
    with graph.inserting_after(linear):
        with pytest.raises(Exception):  # shapes that do not broadcast fail in the fake kernel
            call_function(graph, aten.mm.default, (linear, linear))
    assert [n.name for n in graph.nodes] == before
    graph.lint()


# -- replacements traced from plain PyTorch ------------------------------------------------


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not ASSERT_METADATA]


def test_replace_by_example_traces_at_the_graphs_level_with_metadata_and_provenance():
    torch.manual_seed(0)
    block = Block()
    gm = rewrite.capture(block, (torch.randn(5, 6),)).graph_module
    gelu = _node(gm, aten.gelu.default)
    made = []

    def relu_twice(m):  # gelu(linear(x)) -> relu(linear(x)) * 2, the 2 a constant baked in
        relu_linear = lambda x, w, b, k: torch.relu(F.linear(x, w, b)) * k  # noqa: E731
        made.append(replace_by_example(m, relu_linear, m["x"], m["w"], m["b"], 2.0))
        return made[-1]

    pattern = op(aten.gelu, op(aten.linear, var("x"), var("w"), var("b")))
    Rules(Rule(pattern, relu_twice)).apply(gm)
    assert _calls(gm) == [aten.linear.default, aten.relu.default, aten.mul.Tensor, aten.linear.default]
    new = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not ASSERT_METADATA][:3]
    assert made[0].target is aten.mul.Tensor and made[0].args[1] == 2.0
    for node in new:
        assert isinstance(node.meta["val"], torch.Tensor) and isinstance(node.meta["val"].shape[0], torch.SymInt)
        assert node.meta["nn_module_stack"] == gelu.meta["nn_module_stack"] and module_path(node) == "inner.1"
        assert node.meta["stack_trace"] == gelu.meta["stack_trace"]  # the model's line, not the tracer's
    gm.graph.lint()
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm(x), block._hidden(torch.relu(block.inner[0](x)) * 2))


def test_replace_by_example_returns_an_argument_it_passes_through_and_refuses_what_it_cannot_splice():
    gm = _export(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
    relu = _node(gm, aten.relu.default)
    m = op(aten.relu, var("x")).match(relu)
    before = [n.name for n in gm.graph.nodes]
    assert replace_by_example(m, lambda x: x, m["x"]) is m["x"]
    with pytest.raises(ValueError, match="tensor constant.*add_parameter"):
        replace_by_example(m, lambda x: x + torch.tensor(1.0), m["x"])
    with pytest.raises(ValueError, match="cannot read relu itself"):
        replace_by_example(m, torch.neg, relu)
    with pytest.raises(ValueError, match="one tensor"):
        replace_by_example(m, lambda x: (x, x), m["x"])
    assert [n.name for n in gm.graph.nodes] == before


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * 2


def test_add_parameter_makes_a_trained_saved_parameter_the_replacement_can_read():
    gm = rewrite.capture(Scaled(), (torch.randn(5, 4),)).graph_module
    added = []

    def learned_scale(m):
        scale = add_parameter(gm, "fc.scale", nn.Parameter(torch.full((3,), 2.0)), like=m.root)
        added.append(scale)
        return replace_by_example(m, torch.mul, m["y"], scale)

    x = torch.randn(5, 4)
    expected = gm(x)
    Rules(Rule(op(aten.mul, var("y"), 2), learned_scale)).apply(gm)
    (scale,) = added
    assert scale.op == "get_attr" and scale.target == "fc.scale"
    assert scale.meta["val"].shape == (3,) and scale.meta["val"].requires_grad
    assert "fc.scale" in dict(gm.named_parameters()) and "fc.scale" in gm.state_dict()
    out = gm(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    fc = gm.get_submodule("fc")
    torch.testing.assert_close(fc.scale.grad, (x @ fc.weight.T + fc.bias).sum(0).detach())


def test_add_parameter_names_are_unique_and_plain_tensors_become_buffers():
    gm = _export(Scaled(), torch.randn(2, 4))
    mul = _node(gm, aten.mul.Tensor)
    first = add_parameter(gm, "fc.scale", nn.Parameter(torch.ones(3)), like=mul)
    second = add_parameter(gm, "fc.scale", nn.Parameter(torch.ones(3)), like=mul)
    buffer = add_parameter(gm, "shift", torch.zeros(3), like=mul)
    assert (first.target, second.target, buffer.target) == ("fc.scale", "fc.scale_1", "shift")
    assert "shift" in dict(gm.named_buffers()) and "shift" not in dict(gm.named_parameters())
    assert list(gm.graph.nodes).index(buffer) < list(gm.graph.nodes).index(mul)
    assert fake_mode_of(gm) is not None and buffer.meta["val"].fake_mode is fake_mode_of(gm)


def test_getitem_takes_value_and_provenance_from_the_tuple(net_capture):
    gm = rewrite.module.clone_graph_module(net_capture.graph_module)
    graph = gm.graph
    gelu = next(n for n in graph.nodes if n.target is aten.gelu.default)
    with graph.inserting_after(gelu):
        pair = call_function(graph, aten.var_mean.correction, (gelu, [1]), like=gelu)
    with graph.inserting_after(pair):
        mean = getitem(graph, pair, 1, name="the_mean")
    assert mean.target is operator.getitem and mean.args == (pair, 1)
    assert mean.name == "the_mean"
    assert mean.meta["val"] is pair.meta["val"][1]
    assert mean.meta["nn_module_stack"] == gelu.meta["nn_module_stack"]
    assert op_name(mean) == "getitem"
    assert node_bytes(pair) == 2 * 5 * 4 and node_bytes(mean) == 5 * 4


# -- provenance, parameters ----------------------------------------------------------------


def test_module_path_of_nested_modules(net_capture):
    gm = net_capture.graph_module
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert [module_path(n) for n in linears] == [
        "blocks.0.inner.0",
        "blocks.0._hidden",  # a module whose name starts with "_" is still a module
        "blocks.1.inner.0",
        "blocks.1._hidden",
        "_proj",  # so is a child of the root
        "head",
    ]
    assert module_path(_node(gm, aten.tanh.default)) == ""  # computed in the root's forward
    assert module_path(_placeholder(gm, "x")) == ""


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("", ""),
        ("blocks.0.mlp", "blocks.0.mlp"),
        ("L['self'].blocks[0].mlp", "blocks.0.mlp"),
        ("L__self__.blocks.0", "blocks.0"),
        ("L['self']._enc['key']", "_enc.key"),
        ("_export_root", ""),
        ("_export_root.blocks.0", "blocks.0"),
        ("_private.layer", "_private.layer"),
    ],
)
def test_clean_module_path(raw, clean):
    assert _clean_module_path(raw) == clean


def test_is_shared_tensor_detects_tied_and_multiply_read_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.mid(self.embed(tokens)))

    gm = _export(Tied(), torch.randint(0, 11, (2, 3)))
    get_attrs = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    assert not is_shared_tensor(gm, get_attrs["mid.weight"])
    assert not is_shared_tensor(gm, get_attrs["mid.bias"])
    tied = [n for t, n in get_attrs.items() if t in ("embed.weight", "head.weight")]
    assert tied and all(is_shared_tensor(gm, n) for n in tied)

    # Tied after capture: each get_attr node has a single reader, the tensors are one object.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    gm = _export(Two(), torch.randn(2, 4))
    nodes = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
    assert not is_shared_tensor(gm, nodes["a.weight"]) and not is_shared_tensor(gm, nodes["b.weight"])
    gm.b.weight = gm.a.weight
    assert is_shared_tensor(gm, nodes["a.weight"]) and is_shared_tensor(gm, nodes["b.weight"])
    assert not is_shared_tensor(gm, nodes["b.bias"])


# -- dead code -----------------------------------------------------------------------------


class Chain(nn.Module):
    def forward(self, x):
        h = torch.relu(x * 2).to(torch.float32)  # .to leaves an _assert_tensor_metadata on relu
        return h + 1


def _chain_graph():
    gm = _export(Chain(), torch.randn(3, 4))
    relu = _node(gm, aten.relu.default)
    assert any(u.target is ASSERT_METADATA for u in relu.users), "the capture should assert relu's metadata"
    return gm


def test_erase_dead_removes_a_dead_chain_with_its_metadata_assertions():
    gm = _chain_graph()
    graph = gm.graph
    mul, relu, to, add = (_node(gm, t) for t in (aten.mul.Tensor, aten.relu.default, aten.to.dtype, aten.add.Tensor))
    add.replace_input_with(to, add.args[0].args[0].args[0].args[0])  # add(x, 1): the chain is dead
    erase_dead(graph, [mul, to, relu])  # any order
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert aten.mul.Tensor not in targets and aten.relu.default not in targets and aten.to.dtype not in targets
    assert ASSERT_METADATA not in targets
    graph.lint()
    gm.recompile()
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), x + 1)


def test_erase_dead_keeps_nodes_still_in_use_and_nodes_not_listed():
    gm = _chain_graph()
    graph = gm.graph
    before = [n.name for n in graph.nodes]
    mul, relu, to = (_node(gm, t) for t in (aten.mul.Tensor, aten.relu.default, aten.to.dtype))
    erase_dead(graph, [mul, relu, to])  # `to` still feeds the add: nothing is dead
    assert [n.name for n in graph.nodes] == before

    add = _node(gm, aten.add.Tensor)
    add.replace_input_with(to, relu)
    erase_dead(graph, [to])  # relu is used again; only `to` goes
    names = [n.name for n in graph.nodes]
    assert to.name not in names and relu.name in names and mul.name in names
    assert any(n.target is ASSERT_METADATA for n in graph.nodes)  # relu's assertion stays with relu
    graph.lint()


# -- names and shapes ----------------------------------------------------------------------


def test_op_name_and_format_shape(net_capture):
    gm = net_capture.graph_module
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    x = _placeholder(gm, "x")
    batch = x.meta["val"].shape[0]
    assert op_name(linear) == "aten.linear"
    assert format_shape(linear) == f"f32[{batch}, 10]"
    assert str(batch) != "5", "a symbolic batch is printed as its symbol"
    assert op_name(x) == "x"
    assert format_shape(gm.graph.output_node()) == ""

    class Ops(nn.Module):
        def forward(self, x):
            return (x + 1).to(torch.float16), torch.var_mean(x, dim=0), (x > 0).long()

    gm = _export(Ops(), torch.randn(3, 4))
    add = _node(gm, aten.add.Tensor)
    assert op_name(add) == "aten.add.Tensor"
    assert format_shape(add) == "f32[3, 4]"
    assert format_shape(_node(gm, aten.var_mean.dim)) == "(f32[4], f32[4])"
    half = next(n for n in gm.graph.nodes if tensor_value(n) is not None and tensor_value(n).dtype == torch.float16)
    assert format_shape(half) == "f16[3, 4]"
    gt = _node(gm, aten.gt.Scalar)
    assert format_shape(gt) == "b8[3, 4]"
    graph = fx.Graph()
    inp = graph.placeholder("inp")
    custom = graph.call_function(torch.ops.rewrite.regelu2.default, (inp,))
    assert op_name(custom) == "rewrite.regelu2"
    assert op_name(graph.call_function(operator.getitem, (custom, 0))) == "getitem"


class _InPlace(nn.Module):
    def __init__(self, on_view=False):
        super().__init__()
        self.fc, self.on_view = nn.Linear(4, 4), on_view

    def forward(self, x):
        h = self.fc(x)
        return F.silu(h.view(2, 8) if self.on_view else h, inplace=True) * 2


@pytest.mark.parametrize("case, reason", [("plain", None), ("read_again", "read again afterwards (by mul)"), ("view", "shares memory with")])
def test_out_of_place_problem_names_who_could_see_the_mutation(case, reason):
    from rewrite.graph import out_of_place_problem

    gm = rewrite.capture(_InPlace(on_view=case == "view"), (torch.randn(4, 4),)).graph_module
    silu, mul = _node(gm, aten.silu_.default), _node(gm, aten.mul.Tensor)
    if case == "read_again":  # export rewires later reads to the mutated value; a hand-made graph need not
        mul.args = (silu.args[0], *mul.args[1:])
    problem = out_of_place_problem(silu, silu.args[0])
    assert problem is None if reason is None else reason in problem


def test_out_of_place_problem_refuses_a_model_input():
    from rewrite.graph import out_of_place_problem

    gm = rewrite.capture(_Relu_(), (torch.randn(3),)).graph_module
    (relu,) = [n for n in gm.graph.nodes if n.target is aten.relu_.default]
    assert "model input or parameter" in out_of_place_problem(relu, relu.args[0])


class _Relu_(nn.Module):
    def forward(self, x):
        return torch.relu_(x)
