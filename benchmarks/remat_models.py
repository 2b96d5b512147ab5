"""remat on real models: ours against PyTorch's min-cut partitioner and torch.utils.checkpoint.

Part (b) of the remat claims. Models whose activations dominate the memory of a training step
(an MLP stack, a ResNet-style CNN with batch norm, a small transformer encoder, a ConvNeXt-style
and a ViT-style CNN/encoder written here, and Hugging Face Llama, GPT-2 and BERT from configs),
one training step each: forward, loss = sum of the outputs, ``torch.autograd.grad`` of the
parameters. P0 is the measured peak of the plain eager step; budget b means b * P0 bytes, the
same bytes for every method (ours: ``Remat(budget="<b*P0>B", of="peak")``, an absolute size of
the whole step's peak). For every method, in one process:

- peak: ``rewrite.memory.measure_peak`` (peak bytes of the storages the step allocates
  and holds at once; parameters and inputs not counted), divided by P0; "met" when <= b * P0;
- recompute FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the whole step, above the
  plain step's (it counts matmuls, convolutions and attention only); "+written" is the same for
  the bytes all ops write, which also shows recomputed pointwise ops;
- time to plan: ours, the solver's time (the report's ``solve_time_seconds``; optimize, which
  also traces, checks and measures, in the notes); min-cut, the time its partition function
  takes on the joint graph (what AOTAutograd spends partitioning);
- step time: the fastest of interleaved steps after a warm-up (other processes on a small
  machine only slow steps down; the median is in the returned rows too). Ours and min-cut run
  their graphs through ``fx.Interpreter.boxed_run`` (memory freed after last use), so their
  reference is the plain graph run the same way (AOTAutograd's default partition, "graph");
  the checkpoint baselines run eagerly, their reference is the eager step. "+written" is
  against the same reference.

Methods:

- ours: ``optimize(model, [passes.Remat(budget="<b*P0>B", cost=c)], (x,))`` for each cost
  model c of ``--cost`` (default: flops, the pass's default, then roofline and measured); a PassError (no
  schedule at that budget) is "no schedule". The per-budget table shows the first; the
  "ours by cost model" table and the summary show each;
- min-cut: ``aot_module`` with ``min_cut_rematerialization_partition`` and
  ``torch._functorch.config.activation_memory_budget`` = s, for s on a grid. Its knob is a
  fraction of the activations *it* would save, not of the peak, so two readings: "min-cut @b"
  (s = b, as a user would set it) and "min-cut tuned" (the cheapest setting on the grid whose
  measured peak meets b*P0, found by trying them all: an oracle no user has for free). Batch
  norm is decomposed for it as Inductor does (see ``mincut_decompositions``), and its graph
  reference is the plain graph with the same decomposition;
- checkpoint: every block (and every other block) wrapped in
  ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)``; one peak whatever b
  (not for the Hugging Face models, whose blocks are not a stem-blocks-head stack here).

Activation budget: besides the b * P0 rows, ours runs once more with the pass's default
meaning, ``Remat(budget=0.5, of="activations")`` (the step's activation memory, gradients left
out, at most half the unmodified step's, simulated); the "budget 0.5 of activations" table
gives that ratio, the measured peak, FLOPs, step time and time to plan beside min-cut at
s=0.5 and at its default s=1.

Aim: meet every budget any baseline meets, with no more recompute FLOPs than the best baseline
that meets it; and list the budgets only ours meets. Judged for each cost model.

    python benchmarks/remat_models.py                 # eight models, budgets 0.4..0.9 (over an hour on 2 cores)
    python benchmarks/remat_models.py --quick         # smaller models, two budgets, cost flops (smoke run)
    python benchmarks/remat_models.py --quick --models llama,gpt2,bert,convnext,vit   # the real architectures
    python benchmarks/remat_models.py --models mlp --time-limit 10
    python benchmarks/remat_models.py --cost measured    # ours with each op timed on this machine
    python benchmarks/remat_models.py --models cnn --model-budgets 0.4 --time-limit 120 --intervals 3 --cost flops
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import passes  # noqa: E402
from rewrite import PassError, optimize, zoo  # noqa: E402
from rewrite.report import format_bytes  # noqa: E402
from rewrite.cost_models import COST_MODELS  # noqa: E402
from rewrite.memory import measure_peak  # noqa: E402
from rewrite.training_step import TRAINING_STEP  # noqa: E402
from common import machine  # noqa: E402

BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_BUDGETS = (0.5, 0.8)
MINCUT_SETTINGS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUICK_MINCUT_SETTINGS = (0.5, 0.8, 1.0)
MODELS = ("mlp", "cnn", "transformer", "convnext", "vit", "llama", "gpt2", "bert")
# ours' second run: the pass's own meaning of a budget (a fraction of activation memory)
ACTIVATION_BUDGET = 0.5
# Recompute FLOPs within this fraction of the plain step's count as equal (float counts of
# the same ops in another order agree exactly; this only absorbs reductions such as sums).
FLOPS_TIE = 1e-3
# Gradients must match the eager step's to float rounding (fp32).
GRAD_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- models


class Stacked(nn.Module):
    """stem -> blocks -> head: the block list is what the checkpoint baseline wraps."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Checkpointed(nn.Module):
    """``model`` with every ``every``-th block run under ``torch.utils.checkpoint``."""

    def __init__(self, model: Stacked, every: int):
        super().__init__()
        self.model = model
        self.every = every

    def forward(self, x):
        x = self.model.stem(x)
        for i, block in enumerate(self.model.blocks):
            x = checkpoint(block, x, use_reentrant=False) if i % self.every == 0 else block(x)
        return self.model.head(x)


class MLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus the (projected) input, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: attention (scaled_dot_product_attention) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchEmbedding(nn.Module):
    """ViT's stem: non-overlapping patches projected to tokens, a class token, positions."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim) * 0.02)

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos


class TokenHead(nn.Module):
    """The class token, normalised, to class scores."""

    def __init__(self, dim: int, classes: int = 10):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.norm(x[:, 0]))


@dataclass
class Case:
    name: str
    model: nn.Module  # a Stacked model gets the checkpoint baselines
    inputs: tuple
    # AOTAutograd cannot trace the module itself (Hugging Face's mask code branches on data):
    # the graph and min-cut baselines trace its captured graph, the one ours starts from (with
    # untied embeddings: aot_module's functional_call refuses tied parameters)
    aot_from_capture: bool = False


def mlp_case(quick: bool) -> Case:
    dim, depth, batch = (128, 4, 512) if quick else (256, 8, 2048)
    torch.manual_seed(0)
    model = Stacked(nn.Identity(), [MLPBlock(dim) for _ in range(depth)], nn.Identity())
    return Case(f"MLP stack ({depth} x LayerNorm+Linear+GELU, width {dim}, batch {batch})", model,
                (torch.randn(batch, dim),))  # fmt: skip


def cnn_case(quick: bool) -> Case:
    widths, batch, size = ((8, 16, 32), 8, 16) if quick else ((16, 32, 64), 32, 32)
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
    blocks, cin = [], widths[0]
    for stage, width in enumerate(widths):
        blocks += [BasicBlock(cin, width, 1 if stage == 0 else 2), BasicBlock(width, width)]
        cin = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    model = Stacked(stem, blocks, head)
    return Case(f"ResNet-style CNN ({len(blocks)} basic blocks, widths {widths}, batch norm, {size}x{size}, batch {batch})",
                model, (torch.randn(batch, 3, size, size),))  # fmt: skip


def transformer_case(quick: bool) -> Case:
    dim, depth, heads, seq, batch = (64, 2, 4, 64, 4) if quick else (128, 4, 4, 128, 8)
    torch.manual_seed(0)
    model = Stacked(nn.Identity(), [EncoderBlock(dim, heads) for _ in range(depth)], nn.LayerNorm(dim))
    return Case(f"transformer encoder ({depth} pre-norm blocks, d {dim}, {heads} heads, seq {seq}, batch {batch})",
                model, (torch.randn(batch, seq, dim),))  # fmt: skip


def convnext_case(quick: bool) -> Case:
    dims, depths, batch, size = ((16, 32), (1, 1), 8, 32) if quick else ((32, 64), (2, 2), 16, 64)
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), zoo.ChannelsLayerNorm(dims[0]))
    blocks = [zoo.ConvNeXtBlock(dims[0]) for _ in range(depths[0])]
    blocks.append(nn.Sequential(zoo.ChannelsLayerNorm(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2)))  # downsampling
    blocks += [zoo.ConvNeXtBlock(dims[1]) for _ in range(depths[1])]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[1]), nn.Linear(dims[1], 10))
    return Case(f"ConvNeXt-style CNN ({sum(depths)} blocks: depthwise 7x7, LayerNorm, GELU MLP; widths {dims}, "
                f"{size}x{size}, batch {batch})", Stacked(stem, blocks, head), (torch.randn(batch, 3, size, size),))  # fmt: skip


def vit_case(quick: bool) -> Case:
    dim, depth, heads, size, patch, batch = (32, 2, 2, 16, 4, 8) if quick else (96, 4, 4, 32, 4, 16)
    torch.manual_seed(0)
    model = Stacked(PatchEmbedding(size, patch, dim), [EncoderBlock(dim, heads) for _ in range(depth)], TokenHead(dim))
    return Case(f"ViT-style ({depth} pre-norm blocks, d {dim}, {heads} heads, {size}x{size} in {patch}x{patch} patches, "
                f"batch {batch})", model, (torch.randn(batch, 3, size, size),))  # fmt: skip


def _hf_ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def llama_case(quick: bool) -> Case:
    import transformers

    dim, layers, seq, batch = (64, 2, 32, 2) if quick else (128, 4, 128, 4)
    config = transformers.LlamaConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=seq, attn_implementation="sdpa", use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return Case(f"HF Llama ({layers} layers, hidden {dim}, 4 heads / 2 kv heads, sdpa, seq {seq}, batch {batch})",
                transformers.LlamaForCausalLM(config), (_hf_ids(256, batch, seq),), aot_from_capture=True)  # fmt: skip


def gpt2_case(quick: bool) -> Case:
    import transformers

    dim, layers, seq, batch = (64, 2, 32, 2) if quick else (128, 4, 128, 4)
    config = transformers.GPT2Config(n_embd=dim, n_layer=layers, n_head=4, vocab_size=256, n_positions=seq,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     use_cache=False, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return Case(f"HF GPT-2 ({layers} layers, d {dim}, 4 heads, seq {seq}, batch {batch})",
                transformers.GPT2LMHeadModel(config), (_hf_ids(256, batch, seq),), aot_from_capture=True)  # fmt: skip


def bert_case(quick: bool) -> Case:
    import transformers

    dim, layers, seq, batch = (64, 2, 32, 2) if quick else (128, 4, 128, 4)
    config = transformers.BertConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=4 * dim, vocab_size=256, max_position_embeddings=seq,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return Case(f"HF BERT masked LM ({layers} layers, d {dim}, 4 heads, seq {seq}, batch {batch})",
                transformers.BertForMaskedLM(config), (_hf_ids(256, batch, seq),), aot_from_capture=True)  # fmt: skip


CASES: dict[str, Callable[[bool], Case]] = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "transformer": transformer_case,
    "convnext": convnext_case,
    "vit": vit_case,
    "llama": llama_case,
    "gpt2": gpt2_case,
    "bert": bert_case,
}


# --------------------------------------------------------------------------- one training step


def train_step(module: nn.Module, inputs: tuple, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Forward, loss = sum of the outputs, gradients of ``params`` (returned, not accumulated)."""
    out = module(*inputs)
    loss = sum(t.sum() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return list(torch.autograd.grad(loss, params))


class _BytesWritten(TorchDispatchMode):
    """Bytes of the tensors every op outputs (views excluded): recomputed pointwise ops show here."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if not (schema.returns and all(r.alias_info is not None for r in schema.returns)):
            self.total += sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _interpreted(gm: fx.GraphModule, example_inputs) -> Callable:
    """AOTAutograd compiler that runs the graph node by node, freeing each value (and each
    argument: the boxed convention) after its last use, as ours does."""

    def run(args: list):
        return fx.Interpreter(gm).boxed_run(args)

    run._boxed_call = True
    return run


def mincut_decompositions() -> dict:
    """Batch norm decomposed, as Inductor does before partitioning: the functional batch-norm op
    reads the running statistics the step then updates in place, so a min-cut partition that
    recomputes it in the backward fails autograd's version check ("modified by an inplace
    operation"); decomposed, the normalisation no longer reads them."""
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    return get_decompositions([aten._native_batch_norm_legit_functional, aten.native_batch_norm_backward])


def aot_with(model: nn.Module, partition_fn, decompositions: dict | None = None) -> nn.Module:
    from torch._functorch.aot_autograd import aot_module

    return aot_module(model, fw_compiler=_interpreted, bw_compiler=_interpreted, partition_fn=partition_fn,
                      decompositions=decompositions)  # fmt: skip


@dataclass
class Method:
    key: str
    module: nn.Module
    time_reference: str  # "eager", "graph" or "graph-decomposed"
    budget: float | None = None  # ours: the budget it was planned for
    setting: float | None = None  # min-cut: activation_memory_budget
    every: int | None = None  # checkpoint: every k-th block
    note: str = ""
    failed: bool = False  # ours: the pass raised something other than "no schedule"
    cost: str | None = None  # ours: the cost model it was planned with
    solve_seconds: float = 0.0  # building it: optimize (ours), the first step (min-cut)
    plan_seconds: float | None = None  # ours: the solver's time; min-cut: its partition function's
    of: str | None = None  # ours: what the budget bounds ("peak": b * P0 bytes; "activations")
    simulated_peak: int | None = None
    activation_ratio: float | None = None  # ours: simulated activation peak after / before
    # measured
    peak: int = 0
    flops: int = 0
    written: int = 0
    grad_error: float = 0.0
    times: list[float] = field(default_factory=list)

    @property
    def time(self) -> float:
        """The fastest of the timed steps: other processes on a small machine only ever slow a
        step down, so the minimum is the steadiest estimate (the median is kept as well)."""
        return min(self.times) if self.times else math.nan

    @property
    def median_time(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def _grad_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(grads, reference)))
    norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference))
    return diff / norm if norm else diff


def measure(method: Method, inputs: tuple, params: list[torch.Tensor], reference_grads) -> None:
    """Peak, FLOPs, bytes written and gradient error of one step (compiled before: tracing
    inside the measuring modes would be measured too)."""
    method.peak = measure_peak(lambda: train_step(method.module, inputs, params))
    counter, written = FlopCounterMode(display=False), _BytesWritten()
    with counter, written:
        grads = train_step(method.module, inputs, params)
    method.flops, method.written = counter.get_total_flops(), written.total
    if reference_grads is not None:
        method.grad_error = _grad_error(grads, reference_grads)


def time_steps(methods: list[Method], inputs: tuple, params: list[torch.Tensor], steps: int) -> None:
    for method in methods:  # warm-up
        train_step(method.module, inputs, params)
    for _ in range(steps):  # interleaved: drift in the machine's speed hits all alike
        for method in methods:
            start = time.perf_counter()
            train_step(method.module, inputs, params)
            method.times.append(time.perf_counter() - start)


# --------------------------------------------------------------------------- methods


def build_mincut(model: nn.Module, setting: float, inputs: tuple, params) -> Method:
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    partition_seconds = []

    def timed_partition(*args, **kwargs):
        started = time.perf_counter()
        out = min_cut_rematerialization_partition(*args, **kwargs)
        partition_seconds.append(time.perf_counter() - started)
        return out

    module = aot_with(model, timed_partition, mincut_decompositions())
    started = time.perf_counter()
    try:
        with functorch_config.patch(activation_memory_budget=setting):
            train_step(module, inputs, params)  # AOTAutograd partitions on the first call
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is a row that says so
        method = Method(f"min-cut s={setting:g}", None, "graph-decomposed", setting=setting, failed=True,
                        note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")  # fmt: skip
        method.solve_seconds = time.perf_counter() - started
        return method
    return Method(f"min-cut s={setting:g}", module, "graph-decomposed", setting=setting,
                  solve_seconds=time.perf_counter() - started, plan_seconds=sum(partition_seconds))  # fmt: skip


def build_ours(model: nn.Module, budget: float, p0: int, inputs: tuple, time_limit: float, workers: int,
               cost: str = "flops", intervals: int = 0, of: str = "peak") -> Method:
    """of="peak": the budget is b * P0 bytes of the whole step (``budget="<bytes>B"``);
    of="activations": the fraction b of the step's activation memory (the pass's default)."""
    key = f"ours {cost} b={budget:g}" if of == "peak" else f"ours {cost} b={budget:g} of activations"
    started = time.perf_counter()
    try:
        # verify=False: the numerics check traces again with inputs that need gradients and
        # plans that step too (a second solve); the gradients are checked against eager below.
        # cache=False: every run plans (the time to plan is a column).
        remat = passes.Remat(budget=f"{int(budget * p0)}B" if of == "peak" else budget, of=of, time_limit=time_limit,
                             workers=workers, cost=cost, intervals=intervals, cache=False)  # fmt: skip
        module = optimize(model, [remat], inputs, verify=False)
    except PassError as exc:
        # "no schedule": infeasible, or none found in the time; anything else is a failure.
        message = str(exc).splitlines()[0]
        method = Method(key, None, "graph", budget=budget, note=message, cost=cost, of=of)
        method.failed = "no schedule" not in message
        method.solve_seconds = time.perf_counter() - started
        return method
    method = Method(key, module, "graph", budget=budget, cost=cost, of=of, solve_seconds=time.perf_counter() - started)
    figures = module.report["remat"].figures
    gap = figures.get("solver_gap_fraction")
    method.plan_seconds = figures["solve_time_seconds"]
    method.activation_ratio = figures["activation_peak_after_bytes"] / figures["activation_peak_before_bytes"]
    method.note = f"{figures['solver']}, {figures['solve_time_seconds']:.2f} s" + (f", gap {gap:.0%} to the proved bound" if gap else "")
    partitions = module.meta[TRAINING_STEP].partitions
    method.simulated_peak = next(reversed(partitions.values())).simulated_peak
    return method


# --------------------------------------------------------------------------- one model


def run_case(case: Case, budgets, settings, time_limit: float, workers: int, steps: int, log,
             costs: tuple[str, ...] = ("flops",), intervals: int = 0) -> dict:
    model, inputs = case.model, case.inputs
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the parameters the loss reads (a masked LM head leaves BERT's pooler out)
    out = model(*inputs)
    loss = sum(t.sum() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad)
    params = [p for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)) if g is not None]
    plain = Method("eager", model, "eager")
    measure(plain, inputs, params, None)
    reference_grads = train_step(model, inputs, params)
    p0 = plain.peak
    log(f"\n### {case.name}\n")
    log(f"P0 (plain eager step) = {format_bytes(p0)}; parameters {format_bytes(sum(p.numel() * 4 for p in params))}; "
        f"step FLOPs {plain.flops / 1e9:.2f} G")  # fmt: skip

    from torch._functorch.partitioners import default_partition

    traced = model
    if case.aot_from_capture:  # its parameters are the model's: the gradients are of the same tensors
        from rewrite.capture import capture

        traced = capture(model, inputs, None, mode="train").graph_module
    # The plain step as a graph run by the Interpreter: the reference of ours, and (batch norm
    # decomposed, for models that have it) of min-cut.
    graph = Method("graph", aot_with(traced, default_partition), "eager")
    references = {"eager": plain, "graph": graph, "graph-decomposed": graph}
    methods = [plain, graph]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        references["graph-decomposed"] = Method("graph-decomposed", aot_with(traced, default_partition, mincut_decompositions()),
                                                "eager")  # fmt: skip
        methods.append(references["graph-decomposed"])
    for method in methods[1:]:
        train_step(method.module, inputs, params)  # compiles: not inside the measuring modes
    for every in (1, 2) if isinstance(model, Stacked) else ():
        methods.append(Method(f"checkpoint every {'' if every == 1 else '2nd '}block", Checkpointed(model, every), "eager",
                              every=every))  # fmt: skip
    phases = {}
    started = time.perf_counter()
    mincut = [build_mincut(traced, setting, inputs, params) for setting in settings]
    for method in mincut:
        if method.module is None:
            log(f"  {method.key}: FAILED ({method.note})")
    methods += [m for m in mincut if m.module is not None]
    phases["min-cut partitions"] = time.perf_counter() - started
    started = time.perf_counter()
    ours = []
    for cost in costs:
        for budget in budgets:
            method = build_ours(model, budget, p0, inputs, time_limit, workers, cost, intervals)
            status = ("FAILED" if method.failed else "no schedule") if method.module is None else method.note
            log(f"  ours ({cost}) at b={budget:g} ({format_bytes(int(budget * p0))}): {status}; "
                f"optimize took {method.solve_seconds:.1f} s")  # fmt: skip
            ours.append(method)
    activations = build_ours(model, ACTIVATION_BUDGET, p0, inputs, time_limit, workers, costs[0], intervals, of="activations")
    status = ("FAILED" if activations.failed else "no schedule") if activations.module is None else activations.note
    log(f"  ours ({costs[0]}) at b={ACTIVATION_BUDGET:g} of activations: {status}; optimize took {activations.solve_seconds:.1f} s")
    ours.append(activations)
    phases["ours (optimize)"] = time.perf_counter() - started
    methods += [m for m in ours if m.module is not None]
    started = time.perf_counter()
    for method in methods[1:]:
        measure(method, inputs, params, reference_grads)
    phases["measuring peak, FLOPs"] = time.perf_counter() - started
    started = time.perf_counter()
    time_steps(methods, inputs, params, steps)
    phases["timing"] = time.perf_counter() - started
    for method in methods:
        if method.grad_error > GRAD_TOLERANCE:
            log(f"  WARNING: {method.key}: gradient relative error {method.grad_error:.2e} against eager")

    result = {
        "model": case.name,
        "p0": p0,
        "references": {key: _row(m, references) for key, m in references.items()},
        "checkpoint": [_row(m, references) for m in methods if m.every],
        "mincut": [_row(m, references) for m in mincut],
        "ours_by_cost": {cost: [_row(m, references) for m in ours if m.cost == cost and m.of == "peak"] for cost in costs},
        "ours_activations": _row(activations, references),
        "budgets": list(budgets),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    result["verdict_by_cost"] = {cost: verdict(result, rows) for cost, rows in result["ours_by_cost"].items()}
    return result


def _row(method: Method, references: dict[str, Method]) -> dict:
    """One method's figures: peak and FLOPs against the plain eager step; bytes written and
    step time against the plain step run the same way (``method.time_reference``)."""
    plain, reference = references["eager"], references[method.time_reference]
    row = {
        "method": method.key,
        "budget": method.budget,
        "setting": method.setting,
        "every": method.every,
        "cost": method.cost,
        "scheduled": method.module is not None,
        "failed": method.failed,
        "note": method.note,
        "prepare_seconds": round(method.solve_seconds, 2),
        "plan_seconds": method.plan_seconds,
        "activation_ratio": method.activation_ratio,
    }
    if method.module is None:
        return row
    row.update(
        peak=method.peak,
        peak_ratio=method.peak / plain.peak,
        simulated_ratio=None if method.simulated_peak is None else method.simulated_peak / plain.peak,
        flops=method.flops,
        flops_overhead=(method.flops - plain.flops) / plain.flops if plain.flops else 0.0,
        written_overhead=(method.written - reference.written) / reference.written if reference.written else 0.0,
        time_s=method.time,
        median_time_s=method.median_time,
        time_ratio=method.time / reference.time,
        time_reference=method.time_reference,
        grad_error=method.grad_error,
    )
    return row


# --------------------------------------------------------------------------- reading the results


def meets(row: dict, budget: float) -> bool:
    return row["scheduled"] and row["peak_ratio"] <= budget


def verdict(result: dict, ours_rows: list[dict]) -> dict:
    """Per budget: which baselines meet it, the cheapest of them, and whether ours meets it
    with no more recompute FLOPs."""
    per_budget = []
    for budget in result["budgets"]:
        ours = next(r for r in ours_rows if r["budget"] == budget)
        at_b = next((r for r in result["mincut"] if r["setting"] == budget), None)
        baselines = {r["method"]: r for r in result["checkpoint"]}
        if at_b is not None:
            baselines[f"min-cut @b ({at_b['method']})"] = at_b
        tuned = [r for r in result["mincut"] if meets(r, budget)]
        if tuned:
            best_tuned = min(tuned, key=lambda r: (r["flops"], r["peak"]))
            baselines[f"min-cut tuned ({best_tuned['method']})"] = best_tuned
        meeting = {name: r for name, r in baselines.items() if meets(r, budget)}
        best = min(meeting.items(), key=lambda item: (item[1]["flops"], item[1]["written_overhead"]), default=None)
        ours_met = meets(ours, budget)
        flops_ok = None
        if best is not None and ours_met:
            flops_ok = ours["flops_overhead"] <= best[1]["flops_overhead"] + FLOPS_TIE
        per_budget.append(
            {
                "budget": budget,
                "ours_met": ours_met,
                "ours_status": "met" if ours_met else ("over budget" if ours["scheduled"] else
                                                      ("failed" if ours["failed"] else "no schedule")),
                "baselines_met": sorted(meeting),
                "untuned_met": sorted(n for n in meeting if "tuned" not in n),
                "best_baseline": None if best is None else best[0],
                "best_flops_overhead": None if best is None else best[1]["flops_overhead"],
                "best_written_overhead": None if best is None else best[1]["written_overhead"],
                "ours_written_overhead": ours.get("written_overhead"),
                "ours_flops_overhead": ours.get("flops_overhead"),
                "ours_no_more_flops": flops_ok,
                "only_ours": ours_met and not meeting,
            }
        )
    aim = all(v["ours_met"] and v["ours_no_more_flops"] for v in per_budget if v["baselines_met"])
    return {"per_budget": per_budget, "aim_met": aim, "only_ours": [v["budget"] for v in per_budget if v["only_ours"]]}


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _cell(row: dict | None, budget: float | None) -> str:
    """peak/P0 met | +FLOPs | +written | time x"""
    if row is None:
        return "| - | | | | "
    if not row["scheduled"]:
        return "| FAILED | | | | " if row.get("failed") else "| no schedule | | | | "
    met = "" if budget is None else (" yes" if row["peak_ratio"] <= budget else " NO")
    return (f"| {row['peak_ratio']:.3f}{met} | {_pct(row['flops_overhead'])} | {_pct(row['written_overhead'])} "
            f"| {row['time_ratio']:.2f} ")  # fmt: skip


def print_tables(result: dict, log) -> None:
    refs = result["references"]
    eager = refs["eager"]
    log(f"\nplain step: eager {eager['time_s'] * 1e3:.0f} ms. References run through the fx Interpreter "
        "(AOTAutograd, default partition):")  # fmt: skip
    shown = [("graph", "graph (the reference of ours and min-cut)")]
    if refs["graph-decomposed"]["method"] != "graph":
        shown = [("graph", "graph (ours' reference)"), ("graph-decomposed", "graph, batch norm decomposed (min-cut's reference)")]
    for key, what in shown:
        row = refs[key]
        log(f"  {what}: {row['time_s'] * 1e3:.0f} ms = {row['time_s'] / eager['time_s']:.2f}x eager, "
            f"peak {row['peak_ratio']:.3f} P0, FLOPs {_pct(row['flops_overhead'])}")  # fmt: skip
    log("\nCheckpoint baselines (one peak for every budget; time vs the eager step):\n")
    log("| method | peak/P0 | +FLOPs | +written | time x eager |")
    log("|---|---|---|---|---|")
    for row in result["checkpoint"]:
        log(f"| {row['method']} {_cell(row, None)}|")
    log("\nMin-cut partitioner over its activation_memory_budget setting s (written and time vs min-cut's graph reference):\n")
    log("| s | peak/P0 | +FLOPs | +written | time x graph |")
    log("|---|---|---|---|---|")
    for row in result["mincut"]:
        log(f"| {row['setting']:g} {_cell(row, None)}|")
    log("\nPer budget b (peak/P0 measured; 'yes' when <= b; +FLOPs and +written above the plain step; "
        "+written and time against the plain step run the same way: ours and min-cut x their graph reference, "
        "checkpoint x the eager step):\n")  # fmt: skip
    log(f"| b | ours ({next(iter(result['ours_by_cost']))}): peak/P0 | +FLOPs | +written | time x | (simulated) | min-cut s=b: peak/P0 | +FLOPs | +written | time x "
        "| min-cut tuned: s | peak/P0 | +FLOPs | +written | time x | ckpt every block | ckpt every 2nd |")  # fmt: skip
    log("|" + "---|" * 19)
    for budget in result["budgets"]:
        ours = next(r for r in next(iter(result["ours_by_cost"].values())) if r["budget"] == budget)
        at_b = next((r for r in result["mincut"] if r["setting"] == budget), None)
        tuned = [r for r in result["mincut"] if meets(r, budget)]
        best_tuned = min(tuned, key=lambda r: (r["flops"], r["peak"])) if tuned else None
        sim = "-" if not ours["scheduled"] or ours["simulated_ratio"] is None else f"{ours['simulated_ratio']:.3f}"
        ckpt = " | ".join(
            f"{r['peak_ratio']:.3f} {'yes' if r['peak_ratio'] <= budget else 'NO'}" for r in result["checkpoint"]
        )
        tuned_text = f"| {best_tuned['setting']:g} {_cell(best_tuned, budget)}" if best_tuned else "| none meets | | | | "
        log(f"| {budget:g} {_cell(ours, budget)}| {sim} {_cell(at_b, budget)}{tuned_text}| {ckpt} |")
    log("\nTime to plan (s): ours, the solver's time (optimize, which also traces and measures, in brackets); "
        "min-cut s=b, its partition function on the joint graph:\n")  # fmt: skip
    log("| b | " + " | ".join(f"ours ({c})" for c in result["ours_by_cost"]) + " | min-cut s=b |")
    log("|" + "---|" * (2 + len(result["ours_by_cost"])))
    for budget in result["budgets"]:
        cells = [_plan_time(next(r for r in rows if r["budget"] == budget)) for rows in result["ours_by_cost"].values()]
        at_b = next((r for r in result["mincut"] if r["setting"] == budget), None)
        log(f"| {budget:g} | " + " | ".join(cells) + f" | {_plan_time(at_b)} |")
    log(f"\nBudget {ACTIVATION_BUDGET:g} of activations (ours: Remat(budget={ACTIVATION_BUDGET:g}, of=\"activations\")) "
        f"beside min-cut at s={ACTIVATION_BUDGET:g} and at its default s=1:\n")  # fmt: skip
    log("| method | activations after/before (simulated) | peak/P0 | +FLOPs | +written | time x | plan s |")
    log("|---|---|---|---|---|---|---|")
    for row in _activation_rows(result):
        ratio = "-" if row.get("activation_ratio") is None else f"{row['activation_ratio']:.3f}"
        log(f"| {row['method']} | {ratio} {_cell(row, None)}| {_plan_time(row)} |")
    all_ours = [r for rows in result["ours_by_cost"].values() for r in rows] + [result["ours_activations"]]
    if len(result["ours_by_cost"]) > 1:
        log("\nOurs by cost model (the Remat option cost; peak/P0 measured, +FLOPs, +written, time x graph):\n")
        log("| b | " + " | ".join(f"{c}: peak/P0 | +FLOPs | +written | time x" for c in result["ours_by_cost"]) + " |")
        log("|" + "---|" * (1 + 4 * len(result["ours_by_cost"])))
        for budget in result["budgets"]:
            cells = "".join(_cell(next(r for r in rows if r["budget"] == budget), budget) for rows in result["ours_by_cost"].values())
            log(f"| {budget:g} {cells}|")
    bad = [r for r in [*result["checkpoint"], *result["mincut"], *all_ours]
           if r["scheduled"] and r["grad_error"] > GRAD_TOLERANCE]  # fmt: skip
    worst = max((r["grad_error"] for r in [*result["checkpoint"], *result["mincut"], *all_ours] if r["scheduled"]),
                default=0.0)  # fmt: skip
    log(f"\nGradients against the eager step: worst relative error {worst:.1e}"
        + (f"; ABOVE {GRAD_TOLERANCE:g}: {', '.join(r['method'] for r in bad)}" if bad else ""))  # fmt: skip
    for row in all_ours:
        log(f"  {row['method']}: {row['note']} "
            f"(optimize {row['prepare_seconds']:.1f} s)")  # fmt: skip


def _plan_time(row: dict | None) -> str:
    if row is None or row.get("plan_seconds") is None:
        return "-" if row is None or row["scheduled"] else f"- ({row['prepare_seconds']:.1f})"
    return f"{row['plan_seconds']:.2f}" + (f" ({row['prepare_seconds']:.1f})" if row.get("cost") else "")


def _activation_rows(result: dict) -> list[dict]:
    """Ours at the activation budget, and min-cut at that setting and at its default."""
    mincut = [r for r in result["mincut"] if r["setting"] in (ACTIVATION_BUDGET, 1.0)]
    return [result["ours_activations"], *mincut]


def print_summary(results: list[dict], log) -> None:
    log("\n## Summary\n")
    log(f"Budget {ACTIVATION_BUDGET:g} of activations (ours: activation peak after/before, simulated; all: measured "
        "peak/P0, recompute FLOPs, time to plan in s):\n")  # fmt: skip
    log(f"| model | ours: activations | peak/P0 | +FLOPs | plan s | min-cut s={ACTIVATION_BUDGET:g}: peak/P0 | +FLOPs "
        "| plan s | min-cut s=1: peak/P0 | +FLOPs | plan s |")  # fmt: skip
    log("|" + "---|" * 11)
    for result in results:
        cells = []
        for row in _activation_rows(result)[:3]:
            if not row["scheduled"]:
                cells.append(("FAILED" if row["failed"] else "no schedule") + " | | ")
                continue
            cells.append(f"{row['peak_ratio']:.3f} | {_pct(row['flops_overhead'])} | {_plan_time(row)}")
        ours = result["ours_activations"]
        ratio = "-" if ours.get("activation_ratio") is None else f"{ours['activation_ratio']:.3f}"
        log(f"| {result['model'].split(' (')[0]} | {ratio} | " + " | ".join(cells) + " |")
    log("")
    log("Baselines: checkpoint every block / every 2nd block, min-cut with s=b, and min-cut tuned (cheapest grid "
        "setting that meets b). 'best' is the baseline with the fewest FLOPs among those that meet b.\n")  # fmt: skip
    log("| model | b | baselines that meet b | best baseline: +FLOPs, +written | ours (cost) meets? | ours +FLOPs, +written "
        "| ours FLOPs <= best? |")  # fmt: skip
    log("|---|---|---|---|---|---|---|")
    for result, cost, v in _verdicts(results):
        short = f"{result['model'].split(' (')[0]}"
        for v in v["per_budget"]:
            met = ", ".join(v["baselines_met"]) or "none"
            best = ("-" if v["best_baseline"] is None else
                    f"{v['best_baseline']}: {_pct(v['best_flops_overhead'])}, {_pct(v['best_written_overhead'])}")
            ok = "-" if v["ours_no_more_flops"] is None else ("yes" if v["ours_no_more_flops"] else "NO")
            ours = "-" if v["ours_flops_overhead"] is None else f"{_pct(v['ours_flops_overhead'])}, {_pct(v['ours_written_overhead'])}"
            log(f"| {short} | {v['budget']:g} | {met} | {best} | ({cost}) {'yes' if v['ours_met'] else 'NO (' + v['ours_status'] + ')'} "
                f"| {ours} | {ok} |")  # fmt: skip
    log("")
    for result, cost, v in _verdicts(results):
        short = f"{result['model'].split(' (')[0]}, cost {cost}"
        untuned = [p["budget"] for p in v["per_budget"] if p["ours_met"] and not p["untuned_met"]]
        log(f"- {short}: aim {'met' if v['aim_met'] else 'NOT met'}; budgets only ours meets: "
            f"{', '.join(f'{b:g}' for b in v['only_ours']) or 'none'}; budgets ours meets and no untuned baseline "
            f"(checkpoint, min-cut s=b) does: {', '.join(f'{b:g}' for b in untuned) or 'none'}")  # fmt: skip
    for cost in results[0]["verdict_by_cost"] if results else ():
        log(f"\nAim (every budget a baseline meets, met by ours with no more FLOPs than the best of them), cost {cost}: "
            f"met on {sum(r['verdict_by_cost'][cost]['aim_met'] for r in results)} of {len(results)} models")  # fmt: skip


def _verdicts(results: list[dict]):
    """(result, cost model, verdict) for each model and each cost model ours ran with."""
    for result in results:
        for cost, v in result["verdict_by_cost"].items():
            yield result, cost, v


# --------------------------------------------------------------------------- entry points


def _add(parser: argparse.ArgumentParser, *names, **kwargs) -> None:
    """Add an option unless the parser has it already (the host script's then applies)."""
    try:
        parser.add_argument(*names, **kwargs)
    except argparse.ArgumentError:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--quick", action="store_true", help="smaller models, budgets 0.5 and 0.8, short solves (smoke run)")
    _add(parser, "--models", default=",".join(MODELS), help=f"models to run, from {','.join(MODELS)}")
    _add(parser, "--model-budgets", default=None,
         help="budgets as fractions of the measured plain step's peak (default 0.4,...,0.9; quick 0.5,0.8)")  # fmt: skip
    _add(parser, "--time-limit", type=float, default=None, help="seconds per remat solve (default: the pass's, 60; its early stopping usually ends a solve in seconds)")
    _add(parser, "--workers", type=int, default=os.cpu_count() or 1, help="CP-SAT workers")
    _add(parser, "--steps", type=int, default=None, help="timed steps per method (default 5, quick 2)")
    _add(parser, "--intervals", type=int, default=0, help="ours: retention intervals per tensor (Remat's intervals; 0, its default: 2, then 3, then 4)")
    _add(parser, "--cost", default=None,
         help=f"cost models ours plans with, comma-separated, from {','.join(COST_MODELS)} (the first leads the tables; "
              "default flops,roofline,measured, quick flops)")  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    quick = getattr(args, "quick", False)
    names = [n.strip() for n in getattr(args, "models", ",".join(MODELS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    budgets_text = getattr(args, "model_budgets", None)
    budgets = tuple(float(b) for b in budgets_text.split(",")) if budgets_text else (QUICK_BUDGETS if quick else BUDGETS)
    settings = tuple(sorted(set(QUICK_MINCUT_SETTINGS if quick else MINCUT_SETTINGS) | set(budgets)))
    time_limit = getattr(args, "time_limit", None) or passes.Remat.time_limit
    steps = getattr(args, "steps", None) or (2 if quick else 5)
    workers = getattr(args, "workers", None) or os.cpu_count() or 1
    cost_text = getattr(args, "cost", None) or ("flops" if quick else "flops,roofline,measured")
    costs = tuple(dict.fromkeys(c.strip() for c in cost_text.split(",") if c.strip()))
    if not costs or any(c not in COST_MODELS for c in costs):
        raise SystemExit(f"--cost: choose from {', '.join(COST_MODELS)} (got {getattr(args, 'cost', '')!r})")

    def log(line: str = "") -> None:
        print(line, flush=True)

    log("\n## remat on real models: ours vs min-cut (activation_memory_budget) vs torch.utils.checkpoint\n")
    log(f"machine: {machine()}; remat time limit {time_limit:g} s per solve, {workers} CP-SAT workers; "
        f"budgets {', '.join(f'{b:g}' for b in budgets)}; min-cut settings {', '.join(f'{s:g}' for s in settings)}; "
        f"{steps} timed steps; ours with cost {', '.join(costs)}, {getattr(args, 'intervals', 0) or 'auto'} intervals per tensor")  # fmt: skip
    log(f"code: {code_state()}")
    results = []
    for name in names:
        started = time.perf_counter()
        result = run_case(CASES[name](quick), budgets, settings, time_limit, workers, steps, log, costs,
                          getattr(args, "intervals", 0))  # fmt: skip
        result["seconds"] = round(time.perf_counter() - started, 1)
        print_tables(result, log)
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in result["phase_seconds"].items())
        log(f"({name}: {result['seconds']:.0f} s: {phases})")
        results.append(result)
    print_summary(results, log)
    return results


def code_state() -> str:
    """The commit measured, and the files of the toolkit changed since (the tables depend on them)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "status", "--porcelain", "--", "rewrite", "passes", "solvers"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    files = [line[3:] for line in changed if line.strip()]
    return f"commit {commit}" + (f" with uncommitted changes to {', '.join(files)}" if files else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    started = time.perf_counter()
    run(parser.parse_args())
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
