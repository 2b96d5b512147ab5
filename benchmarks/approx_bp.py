"""approx_bp, baseline and rewritten side by side in one process.

Part 1 (fine-tuning step at realistic widths): a ViT-B-width encoder and a LLaMA-style
decoder, a few blocks each, full fine-tuning with AdamW. For each: activation memory saved
for backward (bytes of the distinct storages autograd saves, measured with
saved_tensors_hooks) in fp32 and under bf16 autocast, training-step time (median of
interleaved steps; fp32 on the CPU, bf16 autocast on a GPU), and on a GPU the peak
``torch.cuda.max_memory_allocated`` of a step.

Part 2 (a few hundred steps of a small real task): a small ViT on scikit-learn's digits and a
small LLaMA-style character model on text from Python's standard library, trained by the
baseline and by the rewritten model from the same initialisation with the same batches, for
five seeds; the spread over seeds is the noise the difference is compared with.

    python benchmarks/approx_bp.py            # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/approx_bp.py --quick    # smaller sizes and fewer steps, for a smoke run
    python benchmarks/approx_bp.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewrite import optimize, zoo  # noqa: E402
from rewrite.memory import record_saved  # noqa: E402
from rewrite.report import format_bytes  # noqa: E402
from common import machine  # noqa: E402


@dataclass
class StepCase:
    name: str
    model: torch.nn.Module
    inputs: tuple
    loss: callable


def vit_case(quick: bool, device: str) -> StepCase:
    size = dict(image_size=224, patch_size=16, dim=768, depth=4, heads=12, classes=100)
    batch = 8
    if quick:
        size.update(image_size=112, depth=2)
        batch = 4
    torch.manual_seed(0)
    model = zoo.vit(**size).to(device)
    images = torch.randn(batch, 3, size["image_size"], size["image_size"], device=device)
    labels = torch.randint(0, size["classes"], (batch,), device=device)
    return StepCase(f"ViT (dim 768, {size['depth']} blocks, {(size['image_size'] // 16) ** 2 + 1} tokens, batch {batch})",
                    model, (images,), lambda out: F.cross_entropy(out, labels))


def llama_case(quick: bool, device: str) -> StepCase:
    size = dict(vocab=8192, dim=1024, depth=4, heads=16, hidden=2816, max_seq=512)
    batch, seq = 4, 256
    if quick:
        size.update(depth=2)
        batch, seq = 2, 128
    torch.manual_seed(0)
    model = zoo.llama(**size).to(device)
    tokens = torch.randint(0, size["vocab"], (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return StepCase(f"LLaMA (dim 1024, {size['depth']} blocks, seq {seq}, batch {batch})", model, (inputs,),
                    lambda out: F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, enabled: bool):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def _step(model, optimizer, case: StepCase, amp: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _autocast(case.inputs[0].device.type, amp):
        loss = case.loss(model(*case.inputs))
    loss.backward()
    optimizer.step()



def measure_step(case: StepCase, device: str, steps: int) -> dict:
    baseline = case.model
    baseline.train()
    rewritten = optimize(copy.deepcopy(baseline), ["approx_bp"], case.inputs, mode="train")
    report = rewritten.report["approx_bp"]
    models = {"baseline": baseline, "approx_bp": rewritten}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

    saved, saved_amp = {}, {}
    for key, model in models.items():
        for amp, into in ((False, saved), (True, saved_amp)):
            with _autocast(device, amp), record_saved(model) as record:
                out = model(*case.inputs)
            into[key] = record.total_bytes
            del out
    amp = device == "cuda"  # GPU steps run as people train there: bf16 autocast

    peak = {}
    if device == "cuda":
        for key, model in models.items():
            _step(model, optimizers[key], case, amp)  # optimizer state allocated before measuring
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(model, optimizers[key], case, amp)
            _sync(device)
            peak[key] = torch.cuda.max_memory_allocated() - base

    times = {k: [] for k in models}
    for key in models:  # warm-up
        _step(models[key], optimizers[key], case, amp)
    for _ in range(steps):  # interleaved, so drift in the machine's speed hits both alike
        for key, model in models.items():
            _sync(device)
            start = time.perf_counter()
            _step(model, optimizers[key], case, amp)
            _sync(device)
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    return {
        "name": case.name,
        "saved": saved,
        "saved_amp": saved_amp,
        "peak": peak,
        "time": median,
        "spread": spread,
        "grad_rel_error": report.numerics.grad_rel_error,
        "changes": len(report.changes),
    }


# -- part 2: training runs -------------------------------------------------------------------


def digits_data(device: str):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order].to(device), y[order].to(device)
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def text_data(device: str, seq: int):
    import argparse as text_a
    import difflib as text_b
    import inspect as text_c

    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (text_a, text_b, text_c))
    data = torch.tensor([min(ord(ch), 127) for ch in text], dtype=torch.long)
    split = int(len(data) * 0.9)
    return data[:split].to(device), data[split:].to(device)


def _batches_digits(train, batch, steps, seed):
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen).to(x.device)
        yield (x[idx],), y[idx]


def _batches_text(data, batch, seq, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).to(data.device)
        window = torch.stack([data[s : s + seq + 1] for s in start.tolist()])
        yield (window[:, :-1],), window[:, 1:]


def train_run(make_model, rewrite: bool, batches, loss_fn, example, lr):
    model = make_model()
    if rewrite:
        model = optimize(model, ["approx_bp"], example, mode="train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for inputs, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses, model


SEEDS = (0, 1, 2, 3, 4)


def _ce(out, target):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def task_results(device: str, steps: int) -> list[dict]:
    """Each task trained from the same initialisation and batches by baseline and approx_bp,
    for several seeds (initialisation and data order): the spread over seeds is the noise."""
    results = []
    train, test = digits_data(device)
    runs = {"baseline": [], "approx_bp": []}
    for seed in SEEDS:

        def make_vit():
            torch.manual_seed(seed)
            return zoo.vit(image_size=16, patch_size=4, channels=1, dim=64, depth=2, heads=4, classes=10).to(device)

        for key in runs:
            losses, model = train_run(make_vit, key == "approx_bp", _batches_digits(train, 64, steps, seed), _ce, (train[0][:32],), 3e-3)
            with torch.no_grad():
                out = model(test[0])
            runs[key].append({"train": statistics.mean(losses[-20:]), "test_loss": _ce(out, test[1]).item(),
                              "test_acc": (out.argmax(-1) == test[1]).float().mean().item()})
    results.append({"name": f"ViT on digits ({steps} steps, batch 64)", "runs": runs})

    seq = 64
    train_text, test_text = text_data(device, seq)
    runs = {"baseline": [], "approx_bp": []}
    example = next(_batches_text(train_text, 8, seq, 1, 99))[0]
    for seed in SEEDS:

        def make_lm():
            torch.manual_seed(seed)
            return zoo.llama(vocab=128, dim=128, depth=2, heads=4, max_seq=seq).to(device)

        for key in runs:
            losses, model = train_run(make_lm, key == "approx_bp", _batches_text(train_text, 32, seq, steps, seed), _ce, example, 3e-3)
            with torch.no_grad():
                test_losses = [_ce(model(*inp), tgt).item() for inp, tgt in _batches_text(test_text, 32, seq, 10, 123)]
            runs[key].append({"train": statistics.mean(losses[-20:]), "test_loss": statistics.mean(test_losses)})
    results.append({"name": f"LLaMA-style char LM on stdlib text ({steps} steps, batch 32, seq {seq})", "runs": runs})
    return results


def _mean_std(values) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer steps (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 10, quick 3)")
    parser.add_argument("--task-steps", type=int, default=None, help="steps of the small real tasks (default 300, quick 60)")
    parser.add_argument("--skip-tasks", action="store_true", help="only the fine-tuning-step measurements")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    task_steps = args.task_steps or (60 if args.quick else 300)
    device = args.device
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"machine: {machine()}")

    precision = "bf16 autocast" if device == "cuda" else "fp32"
    print(f"\n## Fine-tuning step (full fine-tuning, AdamW; steps timed in {precision})\n")
    header = ("| model | saved for backward, fp32: baseline | approx_bp | ratio | saved, bf16 autocast: baseline | approx_bp | ratio "
              "| step time: baseline | approx_bp | ratio |")
    if device == "cuda":
        header += " peak step memory: baseline | approx_bp | ratio |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for make in (vit_case, llama_case):
        r = measure_step(make(args.quick, device), device, steps)
        s, a, t = r["saved"], r["saved_amp"], r["time"]
        row = (
            f"| {r['name']} | {format_bytes(s['baseline'])} | {format_bytes(s['approx_bp'])} | "
            f"{s['approx_bp'] / s['baseline']:.3f} | {format_bytes(a['baseline'])} | {format_bytes(a['approx_bp'])} | "
            f"{a['approx_bp'] / a['baseline']:.3f} | {t['baseline'] * 1e3:.0f} ms | {t['approx_bp'] * 1e3:.0f} ms | "
            f"{t['approx_bp'] / t['baseline']:.3f} |"
        )
        if device == "cuda":
            p = r["peak"]
            row += f" {format_bytes(p['baseline'])} | {format_bytes(p['approx_bp'])} | {p['approx_bp'] / p['baseline']:.3f} |"
        print(row, flush=True)
        lo_b, hi_b = r["spread"]["baseline"]
        lo_a, hi_a = r["spread"]["approx_bp"]
        print(f"<!-- {r['name']}: {r['changes']} nodes rewritten; gradient error vs exact {r['grad_rel_error']:.3g}; "
              f"step time range baseline {lo_b * 1e3:.0f}-{hi_b * 1e3:.0f} ms, approx_bp {lo_a * 1e3:.0f}-{hi_a * 1e3:.0f} ms -->")

    if args.skip_tasks:
        return
    print(f"\n## Small real tasks ({task_steps} steps; mean ± std over seeds {SEEDS}: initialisation and data order)\n")
    print("| task | run | train loss (last 20 steps) | test loss | test accuracy |")
    print("|---|---|---|---|---|")
    for result in task_results(device, task_steps):
        for key, seeds in result["runs"].items():
            acc = _mean_std([r["test_acc"] for r in seeds]) if "test_acc" in seeds[0] else "-"
            print(f"| {result['name']} | {key} | {_mean_std([r['train'] for r in seeds])} | "
                  f"{_mean_std([r['test_loss'] for r in seeds])} | {acc} |")
        base = [r["test_loss"] for r in result["runs"]["baseline"]]
        ours = [r["test_loss"] for r in result["runs"]["approx_bp"]]
        gap = statistics.mean(ours) - statistics.mean(base)
        paired = [o - b for o, b in zip(ours, base)]
        print(f"| {result['name']} | test loss, approx_bp - baseline | mean {gap:+.4f}; per seed "
              f"{', '.join(f'{d:+.4f}' for d in paired)}; seed-to-seed std of baseline {statistics.stdev(base):.4f} | | |")

if __name__ == "__main__":
    main()
