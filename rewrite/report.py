"""The report of a rewrite: what capture assumed, and per pass what it changed, what it left
alone and why, what it measured (activation memory, numerics) and how long it took.

``str(report)`` is the text a person reads; ``report.to_dict()`` is JSON (saved inside the
.pt2 the CLI writes); the graphs before/after each pass are kept for inspection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from rewrite.pass_infra import PassResult
from rewrite.verify import Numerics


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_change(before: float, after: float) -> str:
    """'before -> after (+x.x%)' of two byte counts."""
    change = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{format_bytes(before)} -> {format_bytes(after)}{change}"


def some_names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


@dataclass
class PassReport:
    name: str
    spec: str
    options: dict[str, Any]
    exact_forward: bool
    exact_backward: bool
    result: PassResult
    numerics: Numerics | None
    seconds: float
    before: fx.GraphModule | None = field(default=None, repr=False)
    after: fx.GraphModule | None = field(default=None, repr=False)

    @property
    def changes(self):
        return self.result.changes

    @property
    def skipped(self):
        return self.result.skipped

    @property
    def figures(self) -> dict[str, Any]:
        return self.result.figures

    @property
    def activation_bytes(self) -> tuple[int, int] | None:
        """Bytes saved for backward before and after the pass, measured on the example inputs."""
        n = self.numerics
        if n is None or n.saved_before is None or n.saved_after is None:
            return None
        return n.saved_before.total_bytes, n.saved_after.total_bytes

    @property
    def changed_nothing(self) -> bool:
        """No change recorded, and where the check ran, outputs and gradients as they were."""
        n = self.numerics
        return not self.changes and (n is None or (n.forward_within_rounding and n.backward_within_rounding))

    def kind(self) -> str:
        if self.changed_nothing:  # what the pass would have been is no claim about the graph it left as it was
            return "changed nothing"
        if self.exact_forward and self.exact_backward:
            return "exact"
        if self.exact_forward:
            return "exact forward, approximate backward"
        return "approximate"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "spec": self.spec,
            "options": self.options,
            "kind": self.kind(),
            "seconds": round(self.seconds, 4),
            "changes": [asdict(c) for c in self.changes],
            "skipped": [asdict(s) for s in self.skipped],
            "figures": self.figures,
        }
        if self.result.series:
            out["series"] = self.result.series
        n = self.numerics
        if n is not None:
            out["numerics"] = {
                "output_rel_error": _finite(n.output_rel_error),
                "grad_rel_error": _finite(n.grad_rel_error),
                "grad_cosine": _finite(n.grad_cosine),
                "outputs": [{"name": e.name, "rel": _finite(e.rel), "max_abs": _finite(e.max_abs)} for e in n.outputs],
                "grads": [{"name": e.name, "rel": _finite(e.rel), "max_abs": _finite(e.max_abs)} for e in n.grads],
                "grads_zero_in_both": n.zero_grads,
                "changed_inputs": n.changed_inputs,
                "probes": n.probes,
                "grad_untested": n.grad_untested,
            }
            if self.activation_bytes is not None:
                out["numerics"]["activation_bytes_before"], out["numerics"]["activation_bytes_after"] = self.activation_bytes
        return out

    @property
    def grad_untested(self) -> str | None:
        """Why the gradient check tested nothing of this pass (None: it tested something, or did not run)."""
        return self.numerics.grad_untested if self.numerics is not None else None

    def text(self, eager_bytes: int | None = None) -> str:
        """The pass as text; ``eager_bytes``: activation memory of the user's eager model, shown beside the graph's."""
        untested = ", gradients NOT TESTED" if self.grad_untested else ""
        lines = [f"pass {self.spec}: {self.kind()}{untested}, {self.seconds:.2f} s"]
        if self.changes:
            lines.append(f"  changed {len(self.changes)}:")
            width = max(len(c.node) for c in self.changes)
            for c in self.changes:
                where = f"  [{c.where}]" if c.where else ""
                detail = f"  ({c.detail})" if c.detail else ""
                lines.append(f"    {c.node:<{width}}  {c.before} -> {c.after}{where}{detail}")
        else:
            lines.append("  changed nothing")
        if self.skipped:
            lines.append(f"  left alone {len(self.skipped)}:")
            for s in self.skipped:
                where = f" [{s.where}]" if s.where else ""
                lines.append(f"    {s.node} ({s.op}){where}: {s.reason}")
        for key, value in self.figures.items():
            lines.append(f"  {figure_name(key)}: {format_figure(key, value)}")
        if self.activation_bytes is not None:
            b, a = self.activation_bytes
            lines.append(f"  activation memory saved for backward: {format_change(b, a)}")
            if eager_bytes is not None:
                lines.append(f"    against the eager model: {format_change(eager_bytes, a)}")
        n = self.numerics
        if n is not None:
            if n.outputs:
                worst = n.worst(n.outputs)
                verdict = "within float rounding" if n.forward_within_rounding else "CHANGED"
                lines.append(f"  outputs: relative error {worst.rel:.2g} ({verdict})")
            if n.grad_untested:
                lines.append(f"  gradients: NOT TESTED for this pass: {n.grad_untested}")
            elif n.grad_rel_error is not None:
                verdict = "within float rounding" if n.backward_within_rounding else "approximate gradients"
                lines.append(
                    f"  gradients: relative error {n.grad_rel_error:.3g}, cosine {n.grad_cosine:.5f} ({verdict})"
                )
            lines += [f"    {line}" for line in gradient_notes(n)]
        return "\n".join(lines)


# A figure's unit is the end of its name; the number is formatted only where it is shown.
_UNITS = {
    "_bytes": lambda v: format_bytes(v),
    "_seconds": lambda v: f"{v:.2f} s",
    "_fraction": lambda v: f"{v:.2%}",
    "_ratio": lambda v: f"{v:.3f}",  # kept in the name: "peak ratio" says what it is
}


def figure_name(key: str) -> str:
    """'measured_peak_before_bytes' -> 'measured peak before' (the unit shows in the value)."""
    for suffix in ("_bytes", "_seconds", "_fraction"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key.replace("_", " ")


def format_figure(key: str, value: Any) -> str:
    """A figure as text, by the unit its name ends with (lists element by element)."""
    unit = next((f for suffix, f in _UNITS.items() if key.endswith(suffix)), None)
    if unit is None and isinstance(value, float):
        return f"{value:.5g}"  # a plain number: as many digits as a reader can use
    if unit is None or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(unit(v) for v in value)
    return unit(value)


def gradient_notes(n: Numerics) -> list[str]:
    """What the gradient check compared beyond the outputs' gradients, and what it could not see."""
    notes = []
    if n.probes:
        notes.append(
            "the outputs' gradients are zero at every input of the changed nodes, so the values those nodes "
            f"feed were projected into the loss too: {some_names(n.probes)}"
        )
    worst = n.worst(n.grads)
    if worst is not None and not n.grad_untested and not n.backward_within_rounding:
        # the figure above is over all gradients joined: large unchanged ones can hide one far off
        notes.append(f"largest error: {worst.name}, relative error {worst.rel:.3g}")
    if n.zero_grads:
        notes.append(f"zero in both graphs: {len(n.zero_grads)} of {len(n.grads)} gradients ({some_names(n.zero_grads)})")
    return notes


def _finite(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


@dataclass
class Report:
    model: str
    mode: str
    capture_seconds: float
    dynamic_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passes: list[PassReport] = field(default_factory=list)
    eager_activation_bytes: int | None = None  # saved for backward by the user's model itself, on the example inputs
    fixed_mode: str | None = None  # why the result cannot switch to the other mode (None: it can)

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass {name!r} in this report; it has: {', '.join(p.name for p in self.passes)}")

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "mode": self.mode,
            "capture_seconds": round(self.capture_seconds, 4),
            "dynamic_inputs": self.dynamic_inputs,
            "notes": self.notes,
            "activation_bytes_eager": self.eager_activation_bytes,
            "fixed_mode": self.fixed_mode,
            "passes": [p.to_dict() for p in self.passes],
        }

    def __str__(self) -> str:
        dynamic = ", ".join(self.dynamic_inputs) or "none"
        lines = [f"{self.model} captured in {self.mode} mode ({self.capture_seconds:.2f} s); dynamic batch: {dynamic}"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [p.text(self.eager_activation_bytes) for p in self.passes]
        return "\n".join(lines)

