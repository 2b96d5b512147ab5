"""Passes: a pass is a small frozen dataclass whose fields are its options.

    @dataclass(frozen=True)
    class MyPass(Pass):
        '''One line that ``rewrite passes`` prints.'''
        name: ClassVar[str] = "my_pass"
        threshold: float = option(0.5, "what it does")

        def run(self, gm, ctx) -> PassResult: ...

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
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from rewrite.errors import OptionError, PassError

_BUILTIN_PASSES = {
    "approx_bp": "passes.approx_bp:ApproxBP",
    "remat": "passes.remat:Remat",
}
_registered: dict[str, type[Pass]] = {}


def option(default: Any, doc: str) -> Any:
    """A pass option: its default and the one line of help the CLI and README show."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class PassContext:
    """What a pass may read besides the graph: the example inputs and the capture mode."""

    example_args: tuple
    example_kwargs: dict
    mode: str


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

    def __post_init__(self):
        hints = _field_types(type(self))
        for f in self.options():
            value, annotation = getattr(self, f.name), hints.get(f.name)
            if annotation is not None and not _has_type(value, annotation):
                raise OptionError(
                    f"pass {self.name!r}: option {f.name}={value!r} must be {_type_text(annotation)} ({f.metadata.get('doc', '')})"
                )

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


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits an option's annotation (bool, int, float, str, None, unions of
    these); other annotations are not checked."""
    checks = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        type(None): lambda v: v is None,
    }
    kinds = _kinds(annotation)
    if not all(k in checks for k in kinds):
        return True
    return any(checks[k](value) for k in kinds)


def _type_text(annotation: Any) -> str:
    return " or ".join("none" if k is type(None) else getattr(k, "__name__", str(k)) for k in _kinds(annotation))


def _convert(pass_name: str, option_field: dataclasses.Field, annotation: Any, text: str) -> Any:
    kinds = _kinds(annotation)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("none", "null"):
        return None
    for kind in kinds:
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
    if str in kinds:
        return text.strip()
    raise OptionError(f"pass {pass_name!r}: option {option_field.name}={text!r} is not a valid {_type_text(annotation)}")


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
            key, value = item.split("=", 1)
            options[key.strip()] = value.strip()
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
