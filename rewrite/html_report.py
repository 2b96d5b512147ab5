"""The HTML report: one self-contained file (inline CSS and SVG, no scripts, nothing fetched)
that opens offline. Per pass: the figures it measured, a chart of activation memory per
module before and after, what changed and what was left alone, and the graph code before
and after side by side with the changes highlighted."""

from __future__ import annotations

import html
import os
from collections import OrderedDict
from pathlib import Path

from rewrite.diff import diff_rows
from rewrite.report import PassReport, Report, figure_name, format_bytes, format_figure, gradient_notes
from rewrite.serialize import atomic_write

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 0; background: #f5f6f8; }
header { background: #1d2330; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 0; color: #c5cad6; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 16px 20px; margin: 18px 0; }
h2 { margin: 0 0 10px; font-size: 18px; }
h3 { margin: 18px 0 8px; font-size: 15px; }
.badge { display: inline-block; font-size: 12px; padding: 1px 8px; border-radius: 10px; background: #e6ecf7; color: #2c4a80; margin-left: 6px; vertical-align: middle; }
.badge.approx { background: #fbeedd; color: #8a4b08; }
.badge.untested { background: #fbd3cf; color: #b42318; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #dde1e8; border-radius: 6px; padding: 8px 14px; min-width: 170px; }
.card .k { font-size: 12px; color: #5b6478; }
.card .v { font-size: 18px; font-weight: 600; }
.good { color: #17803d; } .bad { color: #b42318; }
table.list { border-collapse: collapse; width: 100%; font-size: 13px; }
table.list th, table.list td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceef2; vertical-align: top; }
table.list th { background: #f0f2f6; }
table.list.compact { width: auto; min-width: 320px; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.diff { border-collapse: collapse; width: 100%; table-layout: fixed; }
table.diff td { padding: 0 6px; vertical-align: top; white-space: pre-wrap; overflow-wrap: anywhere; font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.diff td.n { width: 34px; color: #8a93a6; text-align: right; user-select: none; }
table.diff th { text-align: left; background: #f0f2f6; padding: 4px 6px; }
td.del { background: #fbd3cf; box-shadow: inset 3px 0 #d92d20; } td.ins { background: #d3f3dc; box-shadow: inset 3px 0 #17803d; }
td.rep-l { background: #fff1c2; box-shadow: inset 3px 0 #c48a00; } td.rep-r { background: #fff1c2; box-shadow: inset 3px 0 #c48a00; }
tr.fold td { color: #8a93a6; background: #fafbfc; font-style: italic; }
.legend span { display: inline-block; margin-right: 16px; font-size: 12px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.muted { color: #5b6478; }
details.kernel { border: 1px solid #dde1e8; border-radius: 6px; margin: 8px 0; }
details.kernel summary { cursor: pointer; padding: 6px 10px; background: #f0f2f6; }
.kernel-body { display: grid; grid-template-columns: minmax(260px, 1fr) 2fr; gap: 12px; padding: 8px 10px; }
.kernel-body > div { min-width: 0; }
.kernel-body pre { margin: 0; padding: 8px; background: #fafbfc; border: 1px solid #eceef2; border-radius: 4px; overflow-x: auto; white-space: pre; }
.kernel-body pre.region { white-space: pre-wrap; overflow-wrap: anywhere; }
.kernel-body h4 { margin: 6px 0 4px; font-size: 13px; }
"""

_BEFORE_COLOR = "#9aa3b5"
_AFTER_COLOR = "#2f6fdf"
_MAX_CHART_ROWS = 40


def _e(text) -> str:
    return html.escape(str(text))


def _module_groups(by_module: dict[str, int], depth: int | None) -> OrderedDict:
    grouped: OrderedDict[str, int] = OrderedDict()
    for path, nbytes in by_module.items():
        key = path if depth is None or path == "(top)" else ".".join(path.split(".")[:depth])
        grouped[key] = grouped.get(key, 0) + nbytes
    return grouped


def _chart_rows(p: PassReport) -> list[tuple[str, int, int]] | None:
    n = p.numerics
    if n is None or n.saved_before is None or p.before is None or p.after is None:
        return None
    before = n.saved_before.by_module(p.before.graph)
    after = n.saved_after.by_module(p.after.graph)
    unattributed = [s for s, by in ((n.saved_before, before), (n.saved_after, after)) if s.total_bytes and not any(by.values())]
    if unattributed:  # saved by a compiled step (remat), not node by node: no per-module split
        return None
    keys = list(OrderedDict.fromkeys([*before, *after]))
    depth = None
    max_depth = max((k.count(".") + 1 for k in keys), default=1)
    while len(keys) > _MAX_CHART_ROWS and (depth or max_depth) > 1:
        depth = (depth or max_depth) - 1
        keys = list(OrderedDict.fromkeys([*_module_groups(before, depth), *_module_groups(after, depth)]))
    b, a = _module_groups(before, depth), _module_groups(after, depth)
    return [(k, b.get(k, 0), a.get(k, 0)) for k in keys if b.get(k, 0) or a.get(k, 0)]


def memory_chart_svg(rows: list[tuple[str, int, int]]) -> str:
    """Horizontal bars: bytes saved for backward per module, before (grey) and after (blue)."""
    if not rows:
        return "<p class='muted'>Nothing was saved for backward.</p>"
    label_w, bar_w, value_w, row_h = 260, 520, 250, 30
    top = 8
    height = top + row_h * len(rows) + 8
    width = label_w + bar_w + value_w
    peak = max(max(b, a) for _, b, a in rows) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="activation memory per module" font-family="system-ui, sans-serif" font-size="12">'
    ]
    for i, (name, before, after) in enumerate(rows):
        y = top + i * row_h
        label = name if len(name) <= 38 else "…" + name[-37:]
        parts.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end" fill="#1d2330">{_e(label)}</text>')
        wb, wa = bar_w * before / peak, bar_w * after / peak
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{wb:.1f}" height="11" fill="{_BEFORE_COLOR}"><title>before: {format_bytes(before)}</title></rect>')
        parts.append(f'<rect x="{label_w}" y="{y + 15}" width="{wa:.1f}" height="11" fill="{_AFTER_COLOR}"><title>after: {format_bytes(after)}</title></rect>')
        change = f" ({(after - before) / before:+.0%})" if before else ""
        parts.append(
            f'<text x="{label_w + bar_w + 8}" y="{y + 17}" fill="#1d2330">{format_bytes(before)} → {format_bytes(after)}{_e(change)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(curves: list[tuple[list[float], str, str]], *, y_text, x_label: str, label: str,
              line: tuple[float, str] | None = None) -> str:
    """Curves (values, colour, tooltip) over a shared x from first to last value, y from 0 to
    the largest value (``y_text`` writes its labels), with an optional horizontal ``line``
    (value, tooltip) in red."""
    curves = [(values, color, title) for values, color, title in curves if values]
    if not curves:
        return ""
    left, plot_w, plot_h, top, bottom = 80, 860, 220, 10, 30
    width, height = left + plot_w + 20, top + plot_h + bottom
    peak = max([v for values, _, _ in curves for v in values] + [line[0] if line else 0]) or 1

    def points(values: list[float]) -> str:
        if len(values) == 1:
            values = values * 2
        step = plot_w / (len(values) - 1)
        return " ".join(f"{left + i * step:.1f},{top + plot_h * (1 - v / peak):.1f}" for i, v in enumerate(values))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_e(label)}" font-family="system-ui, sans-serif" font-size="12">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8a93a6"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#8a93a6"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#5b6478">{_e(y_text(peak * fraction))}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" fill="#5b6478">{_e(x_label)}</text>')
    for values, color, title in curves:
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points(values)}"><title>{_e(title)}</title></polyline>')
    if line:
        y = top + plot_h * (1 - line[0] / peak)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#d92d20" stroke-dasharray="6 4"><title>{_e(line[1])}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def memory_curve_svg(before: list[int], after: list[int], budget: int | None = None) -> str:
    """Memory over the step (x: position in the step, scaled to the same width for both
    curves; y: bytes alive), before (grey) and after (blue), with the budget as a red line."""
    return curve_svg(
        [(before, _BEFORE_COLOR, f"before: peak {format_bytes(max(before or [0]))}"),
         (after, _AFTER_COLOR, f"after: peak {format_bytes(max(after or [0]))}")],
        y_text=format_bytes, x_label="position in the step (forward, then backward) →", label="memory over the step",
        line=(budget, f"budget {format_bytes(budget)}") if budget else None,
    )


def _loss_curve(p: PassReport) -> str:
    losses = (getattr(p.result, "series", {}) or {}).get("loss")
    if not losses:
        return ""
    return (
        f"<h3>Training loss</h3><p class='legend'><span class='muted'>{len(losses)} steps: "
        f"{losses[0]:.4g} → {losses[-1]:.4g} (min {min(losses):.4g})</span></p>"
        + curve_svg([(losses, _AFTER_COLOR, f"loss, last {losses[-1]:.4g}")], y_text=lambda v: f"{v:.3g}",
                    x_label="step →", label="training loss")
    )


def _memory_curve(p: PassReport) -> str:
    series = getattr(p.result, "series", {}) or {}
    before, after = series.get("memory_before"), series.get("memory_after")
    what = "bytes of intermediate tensors alive"
    if series.get("budget_of") == "activations":  # the curves the budget line bounds
        before, after = series.get("activation_memory_before"), series.get("activation_memory_after")
        what = "activation memory (intermediate tensors alive but the gradients the step returns)"
    if not before and not after:
        return ""
    budget = series.get("budget")
    return (
        "<h3>Memory over the step</h3>"
        f"<p class='legend'><span><i class='swatch' style='background:{_BEFORE_COLOR}'></i>before (peak {format_bytes(max(before or [0]))})</span>"
        f"<span><i class='swatch' style='background:{_AFTER_COLOR}'></i>after (peak {format_bytes(max(after or [0]))})</span>"
        + (f"<span><i class='swatch' style='background:#d92d20'></i>budget {format_bytes(budget)}</span>" if budget else "")
        + f"<span class='muted'>{what}, simulated on the example inputs (the measured peaks are in the figures)</span></p>"
        + memory_curve_svg(before or [], after or [], budget)
    )


def _memory_cards(label: str, before: int, after: int) -> list[tuple[str, str, str]]:
    change = (after - before) / before if before else 0.0
    return [
        (f"saved for backward{label}", f"{format_bytes(before)} → {format_bytes(after)}", ""),
        (f"activation memory{label}", f"{change:+.1%}", "good" if change < 0 else ("bad" if change > 0 else "")),
    ]


def _cards(p: PassReport, eager_bytes: int | None) -> str:
    cards = [("changed", str(len(p.changes)), ""), ("left alone", str(len(p.skipped)), "")]
    if p.activation_bytes is not None:
        b, a = p.activation_bytes
        cards += _memory_cards("", b, a)
        if eager_bytes is not None:
            cards += _memory_cards(" (against the eager model)", eager_bytes, a)
    n = p.numerics
    if n is not None and n.outputs:
        worst = n.worst(n.outputs)
        cards.append(("output error (relative)", f"{worst.rel:.2g}", "good" if n.forward_within_rounding else "bad"))
    if n is not None and n.grad_untested:
        cards.append(("gradient check", "tested nothing", "bad"))
    elif n is not None and n.grad_rel_error is not None:
        cls = "good" if n.backward_within_rounding else ""
        cards.append(("gradient error (relative)", f"{n.grad_rel_error:.3g}", cls))
        cards.append(("gradient cosine", f"{n.grad_cosine:.5f}", cls))
    if n is not None and n.zero_grads:
        cards.append(("gradients zero in both graphs", f"{len(n.zero_grads)} of {len(n.grads)}", ""))
    cards.append(("time", f"{p.seconds:.2f} s", ""))
    lines = []
    if n is not None:
        if n.grad_untested:
            lines.append(f"<p class='bad'>The gradient check tested nothing of this pass: {_e(n.grad_untested)}.</p>")
        lines += [f"<p class='muted'>{_e(note)}</p>" for note in gradient_notes(n)]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><div class='k'>{_e(k)}</div><div class='v {c}'>{_e(v)}</div></div>" for k, v, c in cards
    ) + "</div>" + "".join(lines)


def _changes_table(p: PassReport) -> str:
    parts = []
    if p.changes:
        rows = "".join(
            f"<tr><td><code>{_e(c.node)}</code></td><td>{_e(c.where)}</td><td><code>{_e(c.before)}</code> → "
            f"<code>{_e(c.after)}</code></td><td>{_e(c.detail)}</td></tr>"
            for c in p.changes
        )
        parts.append(
            f"<h3>What changed ({len(p.changes)})</h3><table class='list'><tr><th>node</th><th>module</th>"
            f"<th>rewrite</th><th>detail</th></tr>{rows}</table>"
        )
    else:
        parts.append("<h3>What changed</h3><p class='muted'>Nothing: the pass found nothing to rewrite.</p>")
    if p.skipped:
        rows = "".join(
            f"<tr><td><code>{_e(s.node)}</code></td><td>{_e(s.where)}</td><td><code>{_e(s.op)}</code></td><td>{_e(s.reason)}</td></tr>"
            for s in p.skipped
        )
        parts.append(
            f"<h3>Left alone ({len(p.skipped)})</h3><table class='list'><tr><th>node</th><th>module</th>"
            f"<th>op</th><th>why</th></tr>{rows}</table>"
        )
    if p.figures:
        rows = "".join(f"<tr><td>{_e(figure_name(k))}</td><td>{_e(format_figure(k, v))}</td></tr>" for k, v in p.figures.items())
        parts.append(f"<h3>Figures</h3><table class='list compact'>{rows}</table>")
    return "".join(parts)


def _diff_table(p: PassReport, context: int = 4) -> str:
    if p.before is None or p.after is None:
        return ""
    rows = diff_rows(p.before, p.after)
    changed = [i for i, r in enumerate(rows) if r.tag != "equal"]
    keep = {j for i in changed for j in range(i - context, i + context + 1)}
    out, ln, rn, hidden = [], 0, 0, 0
    for i, r in enumerate(rows):
        ln += r.left is not None
        rn += r.right is not None
        if i not in keep:
            hidden += 1
            continue
        if hidden:
            out.append(f"<tr class='fold'><td class='n'></td><td colspan='3'>… {hidden} unchanged lines …</td></tr>")
            hidden = 0
        lc, rc = {"equal": ("", ""), "delete": ("del", ""), "insert": ("", "ins"), "replace": ("rep-l", "rep-r")}[r.tag]
        out.append(
            f"<tr><td class='n'>{ln if r.left is not None else ''}</td><td class='{lc}'>{_e(r.left or '')}</td>"
            f"<td class='n'>{rn if r.right is not None else ''}</td><td class='{rc}'>{_e(r.right or '')}</td></tr>"
        )
    if hidden:
        out.append(f"<tr class='fold'><td class='n'></td><td colspan='3'>… {hidden} unchanged lines …</td></tr>")
    legend = (
        "<p class='legend'><span><i class='swatch' style='background:#fbd3cf'></i>removed</span>"
        "<span><i class='swatch' style='background:#d3f3dc'></i>added</span>"
        "<span><i class='swatch' style='background:#fff1c2'></i>changed (same node, new arguments)</span></p>"
    )
    return (
        f"<h3 id='{_e(p.name)}-graphs'>Graph before and after</h3>{legend}<table class='diff'><colgroup><col style='width:40px'><col>"
        "<col style='width:40px'><col></colgroup><tr><th></th><th>before</th><th></th><th>after</th></tr>"
        + "".join(out)
        + "</table>"
    )


def _kernels_section(p: PassReport) -> str:
    """The Triton source of each rewrite op this pass added, next to the region it computes."""
    if p.before is None or p.after is None:
        return ""
    from rewrite.graph import op_name
    from rewrite.kernel_listing import kernel_listings

    existing = {n.name for n in p.before.graph.nodes if op_name(n).startswith("rewrite.")}
    added = {n.name for n in p.after.graph.nodes if op_name(n).startswith("rewrite.") and n.name not in existing}
    if not added:
        return ""
    try:
        listings = kernel_listings(p.after, only=added)
    except Exception as exc:  # noqa: BLE001 - the report still renders; the reason is shown
        return f"<h3>Emitted kernels</h3><p class='bad'>could not emit the kernels' source: {_e(exc)}</p>"
    if not listings:
        return ""
    items = []
    for k, listing in enumerate(listings):
        sources = "".join(f"<h4>{_e(name)} kernel</h4><pre>{_e(src)}</pre>" for name, src in listing.sources.items())
        items.append(
            f"<details class='kernel'{' open' if k == 0 else ''}><summary><code>{_e(listing.op)}</code> at "
            f"<code>{_e(listing.node)}</code> · {len(listing.sources)} kernel(s)</summary>"
            f"<div class='kernel-body'><div><h4>region</h4><pre class='region'>{_e(listing.region)}</pre></div>"
            f"<div>{sources}</div></div>"
            "</details>"
        )
    return (
        f"<h3 id='{_e(p.name)}-kernels'>Emitted kernels</h3><p class='muted'>Triton source codegen emits for the ops "
        "this pass added, for the dtypes and layouts of the example inputs; they run on CUDA (elsewhere the ops run "
        "their PyTorch reference).</p>" + "".join(items)
    )


def _pass_section(p: PassReport, eager_bytes: int | None) -> str:
    approx = "" if (p.exact_forward and p.exact_backward) or p.changed_nothing else " approx"
    untested = "<span class='badge untested'>gradients not tested</span>" if p.grad_untested else ""
    chart_rows = _chart_rows(p)
    chart = ""
    if chart_rows is not None:
        chart = (
            "<h3>Activation memory saved for backward, per module</h3>"
            f"<p class='legend'><span><i class='swatch' style='background:{_BEFORE_COLOR}'></i>before</span>"
            f"<span><i class='swatch' style='background:{_AFTER_COLOR}'></i>after</span>"
            "<span class='muted'>measured on the example inputs; a storage saved twice counts once</span></p>"
            + memory_chart_svg(chart_rows)
        )
    return (
        f"<section><h2>pass <code>{_e(p.spec)}</code><span class='badge{approx}'>{_e(p.kind())}</span>{untested}</h2>"
        + _cards(p, eager_bytes)
        + _memory_curve(p)
        + _loss_curve(p)
        + chart
        + _changes_table(p)
        + _kernels_section(p)
        + _diff_table(p)
        + "</section>"
    )


def render_html(report: Report) -> str:
    dynamic = ", ".join(report.dynamic_inputs) or "none"
    notes = "".join(f"<p class='muted'>note: {_e(n)}</p>" for n in report.notes)
    summary = "; ".join(f"{p.spec}: {len(p.changes)} changed" for p in report.passes) or "no passes"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>rewrite report: {_e(report.model)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>rewrite report: {_e(report.model)}</h1>"
        f"<p>captured in {_e(report.mode)} mode in {report.capture_seconds:.2f} s · dynamic batch: {_e(dynamic)} · {_e(summary)}</p></header>"
        f"<main>{notes}{''.join(_pass_section(p, report.eager_activation_bytes) for p in report.passes)}</main></body></html>"
    )


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write the report to ``path`` (through a temporary file renamed into place)."""
    return atomic_write({path: render_html(report)})[0]
