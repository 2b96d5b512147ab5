"""Passes: a pass is a small frozen dataclass whose fields are its options.

    @dataclass(frozen=True)
    class MyPass(Pass):
        '''One line that ``rewrite passes`` prints.'''
        name: ClassVar[str] = "my_pass"
        threshold: float = option(0.5, "what it does", gt=0, le=1)
        mode: Literal["fast", "exact"] = option("fast", "how")

        def run(self, gm, ctx) -> PassResult: ...

Every option is checked when the pass is made, from Python or from a CLI spec, in
``Pass.__post_init__``: its type, the bounds ``option`` declares for a number (a float that
is nan or infinite only where a bound names infinity), the values a ``Literal`` lists, and
text through the option's ``parse``. A refused value is an ``OptionError`` naming the pass,
the option, the value and what it may be; a pass checks in its own ``__post_init__`` (after
``super().__post_init__()``) only what depends on more than one option.

``check`` is the precondition (raise ``PassError`` with what to do), ``run`` rewrites ``gm``
in place and returns what it changed and what it left alone and why, ``postcondition`` checks
what must hold afterwards. Every node a pass adds carries ``meta["val"]`` (the helpers in
``rewrite.graph`` fill it), which later passes and the reports read. Whether the pass is
exact is declared by ``exact_forward`` / ``exact_backward``; the PassManager holds the pass
to it on the example inputs and reports the error of an approximate one.

The registry maps names to passes. The toolkit's own passes are looked up by module path
when first asked for (``rewrite`` never imports ``passes`` up front); ``register_pass``
adds a user's pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.fx as fx

from rewrite.errors import OptionError, PassError

_BUILTIN_PASSES = {
    "approx_bp": "passes.approx_bp:ApproxBP",
    "remat": "passes.remat:Remat",
}
_registered: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Range:
    """Where a numeric option's value may lie. A side without a bound stops short of infinity,
    so nan and the infinities are refused unless a closed bound names them (``le=math.inf``)."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    def __contains__(self, value) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def text(self, name: str) -> str:
        """'0 < budget <= 1'; 'a finite number' without bounds."""
        low, high = "", ""
        if self.low_closed or self.low > -math.inf:
            low = f"{format_value(self.low)} {'<=' if self.low_closed else '<'} "
        if self.high_closed or self.high < math.inf:
            high = f" {'<=' if self.high_closed else '<'} {format_value(self.high)}"
        return f"{low}{name}{high}" if low or high else "a finite number"


def option(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A pass option: its default, the one line of help the CLI and README show (say there why
    the bounds are where they are), the bounds of a number (``gt=0, le=1``: 0 < value <= 1) and,
    for text, ``parse``, which reads a value and raises ValueError saying why it cannot."""
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise TypeError("option: give one lower bound (ge or gt) and one upper bound (le or lt) at most")
    bounds = Range(
        low=next((b for b in (ge, gt) if b is not None), -math.inf),
        high=next((b for b in (le, lt) if b is not None), math.inf),
        low_closed=ge is not None,
        high_closed=le is not None,
    )
    return field(default=default, metadata={"doc": doc, "range": bounds, "parse": parse})


def allowed_text(cls: type[Pass], option_field: dataclasses.Field) -> str:
    """What an option accepts beyond its type, for help and the README: '0 < budget <= 1',
    'training, inference'; '' when any value of its type will do."""
    literals = [k for k in _kinds(_field_types(cls).get(option_field.name)) if _is_literal(k)]
    parts = [", ".join(format_value(v) for v in typing.get_args(k)) for k in literals]
    return " or ".join(filter(None, [*parts, _range_text(option_field)]))


def option_help(cls: type[Pass], option_field: dataclasses.Field) -> str:
    """The option's doc, then what it accepts in brackets."""
    allowed = allowed_text(cls, option_field)
    return option_field.metadata.get("doc", "") + (f" [{allowed}]" if allowed else "")


@dataclass
class PassContext:
    """What a pass may read besides the graph: the example inputs, the capture mode, the user's
    batches (``data`` to learn from, ``eval_data`` to measure on; re-iterable, e.g. DataLoaders
    of ``(inputs, target)`` pairs or of bare inputs: see ``rewrite.training.split_batch``), where
    to report progress, and a seed (``generator()``) so that what a pass draws is repeatable."""

    example_args: tuple
    example_kwargs: dict
    mode: str
    data: Iterable | None = None
    eval_data: Iterable | None = None
    progress: Callable[[str], None] = field(default=lambda message: None, repr=False)
    seed: int = 0

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed``: the same draws every time it is asked for."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class Change:
    node: str
    where: str  # module path, e.g. "blocks.0.mlp.act"
    before: str  # what the node was, e.g. "aten.gelu"
    after: str  # what replaced it, e.g. "rewrite.regelu2"
    detail: str = ""


@dataclass
class Skip:
    node: str
    where: str
    op: str
    reason: str


@dataclass
class PassResult:
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    # Curves for the HTML report (name -> list of numbers or one number), not printed as text.
    series: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass(ABC):
    name: ClassVar[str]
    # A pass that learns from the user's batches (optimize(..., data=...)); without them it is
    # refused before the model is captured.
    needs_data: ClassVar[bool] = False
    # Ordering rules the PassManager checks before anything runs: why the pass must be the last
    # one (None: it need not), and the passes that must not come after it.
    runs_last: ClassVar[str | None] = None

    def __post_init__(self):
        hints = _field_types(type(self))
        for f in self.options():
            value = getattr(self, f.name)
            problem = _option_problem(f, hints.get(f.name), value)
            if problem:
                raise OptionError(f"pass {self.name!r}: option {f.name}={value!r} {problem} ({f.metadata.get('doc', '')})")

    @property
    def exact_forward(self) -> bool:
        """Outputs equal the original's up to float rounding."""
        return True

    @property
    def exact_backward(self) -> bool:
        """Gradients equal the original's up to float rounding."""
        return True

    def check(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Precondition; raise PassError saying what is wrong and what to do."""

    def postcondition(self, gm: fx.GraphModule, ctx: PassContext, result: PassResult) -> None:
        """What must hold after ``run``; raise PassError when it does not."""

    @abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` in place; say what changed and what was left alone."""

    def evaluate(self, before: fx.GraphModule, after: fx.GraphModule, ctx: PassContext) -> dict[str, float]:
        """The quality of an approximate pass's result on ``ctx.eval_data`` (the PassManager asks
        when it is given): by default accuracy against the labels, if the batches have them,
        and agreement with the graph before. A pass may measure what fits it better."""
        from rewrite.training import quality

        return quality(before, after, ctx.eval_data, len(ctx.example_args))

    def fail(self, message: str) -> PassError:
        return PassError(self.name, message)

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring ('' without one: not dataclass's signature text)."""
        doc = (cls.__dict__.get("__doc__") or "").strip()
        if not doc or doc.startswith(f"{cls.__name__}("):
            return ""
        return doc.splitlines()[0]

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    def options_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.options()}

    def spec(self) -> str:
        """The CLI spelling of this pass with its non-default options."""
        changed = [
            f"{f.name}={format_value(getattr(self, f.name))}" for f in self.options() if getattr(self, f.name) != f.default
        ]
        return self.name + ("{" + ",".join(changed) + "}" if changed else "")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a user-defined pass available by name (also to ``optimize(passes=[...])``)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not getattr(cls, "name", None):
        raise OptionError("register_pass needs a Pass subclass with a `name`")
    _registered[cls.name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(set(_BUILTIN_PASSES) | set(_registered))


def pass_class(name: str) -> type[Pass]:
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN_PASSES:
        raise OptionError(f"unknown pass {name!r}; the passes are: {', '.join(pass_names())}")
    module_name, class_name = _BUILTIN_PASSES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    _registered[name] = cls
    return cls


def _field_types(cls: type[Pass]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kinds(annotation: Any) -> tuple:
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return typing.get_args(annotation) if union else (annotation,)


_TYPE_CHECKS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


def _is_literal(kind: Any) -> bool:
    return typing.get_origin(kind) is Literal


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits an option's annotation (bool, int, float, str, None, Literal,
    unions of these); other annotations are not checked."""
    kinds = _kinds(annotation)
    if not all(k in _TYPE_CHECKS or _is_literal(k) for k in kinds):
        return True
    return any(
        any(type(value) is type(v) and value == v for v in typing.get_args(k)) if _is_literal(k) else _TYPE_CHECKS[k](value)
        for k in kinds
    )


def _type_text(annotation: Any) -> str:
    def text(kind):
        if _is_literal(kind):
            return "one of " + ", ".join(map(repr, typing.get_args(kind)))
        return "none" if kind is type(None) else getattr(kind, "__name__", str(kind))

    return " or ".join(map(text, _kinds(annotation)))


def _range_text(option_field: dataclasses.Field) -> str:
    """'1 <= intervals <= 8' where the option declares bounds, else ''."""
    bounds = option_field.metadata.get("range", Range())
    return "" if bounds == Range() else bounds.text(option_field.name)


def _type_and_range_text(option_field: dataclasses.Field, annotation: Any) -> str:
    bounds = _range_text(option_field)
    return _type_text(annotation) + (f", {bounds}" if bounds else "")


def _option_problem(option_field: dataclasses.Field, annotation: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for this option (None: nothing), as the end of a sentence
    that starts 'option name=value'."""
    if annotation is not None and not _has_type(value, annotation):
        return f"must be {_type_and_range_text(option_field, annotation)}"
    bounds = option_field.metadata.get("range", Range())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in bounds:
        return f"must be {bounds.text(option_field.name)}"
    parse = option_field.metadata.get("parse")
    if parse is not None and isinstance(value, str):
        try:
            parse(value)
        except ValueError as exc:
            return f"is not valid: {exc}"
    return None


def _convert(pass_name: str, option_field: dataclasses.Field, annotation: Any, text: str) -> Any:
    kinds = _kinds(annotation)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("none", "null"):
        return None
    for kind in kinds:
        if _is_literal(kind):
            for value in typing.get_args(kind):
                if format_value(value) == text.strip():
                    return value
        if kind is bool and lowered in ("true", "false", "1", "0", "yes", "no"):
            return lowered in ("true", "1", "yes")
        if kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        if kind is float:
            try:
                return float(text)
            except ValueError:
                pass
    if str in kinds or any(map(_is_literal, kinds)):
        return text.strip()  # a value no Literal lists is refused, with the list, when the pass is made
    raise OptionError(
        f"pass {pass_name!r}: option {option_field.name}={text!r} is not a valid {_type_and_range_text(option_field, annotation)}"
    )


def make_pass(name: str, raw_options: dict[str, Any] | None = None) -> Pass:
    """A pass by name with options given as strings (CLI) or values (Python)."""
    cls = pass_class(name)
    fields = {f.name: f for f in cls.options()}
    types_ = _field_types(cls)
    options = {}
    for key, value in (raw_options or {}).items():
        if key not in fields:
            valid = ", ".join(f"{f.name} ({f.metadata.get('doc', '')})" for f in fields.values()) or "none"
            raise OptionError(f"pass {name!r} has no option {key!r}; its options are: {valid}")
        options[key] = _convert(name, fields[key], types_[key], value) if isinstance(value, str) else value
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"pass {name!r}: {exc}") from exc


_SPEC = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """``"approx_bp{norms=false},remat{budget=0.5}"`` -> pass objects."""
    passes, position = [], 0
    text = text.strip()
    while position < len(text):
        m = _SPEC.match(text, position)
        if not m or m.end() == position:
            raise OptionError(
                f"cannot read the pass list {text!r} at {text[position:]!r}; write name{{option=value,...}},name2"
            )
        name, body = m.group(1), m.group(2)
        options = {}
        for item in filter(None, (part.strip() for part in (body or "").split(","))):
            if "=" not in item:
                raise OptionError(f"pass {name!r}: option {item!r} needs a value (option=value)")
            key, value = (part.strip() for part in item.split("=", 1))
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]  # quoted as in Python: budget="1.5GB"
            if key in options:
                raise OptionError(
                    f"pass {name!r}: option {key} is given twice ({key}={options[key]} and {key}={value}); give it once"
                )
            options[key] = value
        passes.append(make_pass(name, options))
        position = m.end()
    if not passes:
        raise OptionError("no pass given; the passes are: " + ", ".join(pass_names()))
    return passes


def resolve_passes(passes) -> list[Pass]:
    """Names, CLI specs and Pass objects -> Pass objects."""
    if isinstance(passes, (str, Pass)) or not isinstance(passes, Iterable):
        passes = [passes]
    resolved = []
    for item in passes:
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, str):
            resolved.extend(parse_pipeline(item))
        elif isinstance(item, type) and issubclass(item, Pass):
            raise OptionError(f"{item.__name__} is a pass class; give an object of it, e.g. {item.__name__}()")
        else:
            raise OptionError(f"a pass is a name or a Pass object, not {type(item).__name__}")
    return resolved
