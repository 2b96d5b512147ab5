"""Pass infrastructure: passes as frozen dataclasses whose fields are options, the registry,
the CLI spelling of a pipeline (parsed, converted by type, refused with a clear message), and
option values checked in one place against their type, range or listed values, from Python,
a spec or the command line (and fuzzed: a spec gives passes or an OptionError, nothing else)."""

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rewrite
from rewrite import Change, OptionError, Pass, PassResult, option, optimize, pass_names, register_pass
from rewrite import pass_infra
from rewrite.cli import main
from rewrite.pass_infra import allowed_text, make_pass, parse_pipeline, pass_class, resolve_passes

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    """Passes registered by a test are forgotten after it."""
    monkeypatch.setattr(pass_infra, "_registered", dict(pass_infra._registered))


@dataclass(frozen=True)
class Tunable(Pass):
    """A pass with one option of every kind.

    Second line of its documentation.
    """

    name: ClassVar[str] = "tunable"
    enabled: bool = option(True, "turn it on")
    count: int = option(3, "how many")
    ratio: float = option(0.5, "how much")
    limit: float | None = option(None, "an upper bound, or none")
    cap: Optional[int] = option(7, "an optional integer")
    label: str = option("plain", "a name")

    def run(self, gm, ctx):
        return PassResult()


@dataclass(frozen=True)
class Validated(Pass):
    name: ClassVar[str] = "validated"
    ratio: float = option(0.5, "between 0 and 1")

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be between 0 and 1, not {self.ratio}")

    def run(self, gm, ctx):
        return PassResult()


def _word(text: str) -> str:
    if not text.isalpha():
        raise ValueError(f"{text!r} is not a word")
    return text


@dataclass(frozen=True)
class Bounded(Pass):
    """Options with ranges and fixed values."""

    name: ClassVar[str] = "bounded"
    count: int = option(2, "how many", ge=1, le=8)
    ratio: float = option(0.5, "how much", gt=0, le=1)
    limit: float = option(math.inf, "an upper bound; inf for none", gt=0, le=math.inf)
    size: float | str = option(1.0, "a number or a word", ge=0, lt=10, parse=_word)
    mode: Literal["fast", "exact"] = option("fast", "how")

    def run(self, gm, ctx):
        return PassResult()


@dataclass(frozen=True)
class GeluCounter(Pass):
    """Counts GELUs; doubles nothing."""

    name: ClassVar[str] = "gelu_counter"
    tag: str = option("seen", "what to call them")

    def run(self, gm, ctx):
        gelus = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
        return PassResult(
            changes=[Change(n.name, "", "aten.gelu", "aten.gelu", self.tag) for n in gelus],
            figures={"gelus": len(gelus), "mode": ctx.mode},
        )


# -- parsing -------------------------------------------------------------------------------


def test_two_passes_with_their_options():
    passes = parse_pipeline("approx_bp{norms=false},approx_bp")
    from passes import ApproxBP

    assert passes == [ApproxBP(norms=False), ApproxBP()]
    assert passes[0].norms is False and passes[0].gelu is True and passes[0].silu is True
    assert passes[1].norms is True
    assert [p.spec() for p in passes] == ["approx_bp{norms=false}", "approx_bp"]


def test_whitespace_and_several_options():
    passes = parse_pipeline("  approx_bp { gelu = false , silu=0 } ,  approx_bp{} ")
    assert [p.options_dict() for p in passes] == [
        {"gelu": False, "silu": False, "norms": True, "min_cosine": 0.9},
        {"gelu": True, "silu": True, "norms": True, "min_cosine": 0.9},
    ]


@pytest.mark.parametrize(
    "text,value",
    [("true", True), ("false", False), ("1", True), ("0", False), ("True", True), ("FALSE", False), ("yes", True), ("no", False)],
)
def test_bool_values(text, value):
    register_pass(Tunable)
    assert parse_pipeline(f"tunable{{enabled={text}}}")[0].enabled is value


def test_values_are_converted_by_the_options_type():
    register_pass(Tunable)
    (p,) = parse_pipeline("tunable{count=12,ratio=0.25,limit=1.5,cap=none,label=fancy}")
    assert p.count == 12 and type(p.count) is int
    assert p.ratio == 0.25 and type(p.ratio) is float
    assert p.limit == 1.5 and type(p.limit) is float
    assert p.cap is None
    assert p.label == "fancy"
    (q,) = parse_pipeline("tunable{ratio=2,limit=NONE,cap=4,count=-3}")
    assert q.ratio == 2.0 and type(q.ratio) is float
    assert q.limit is None and q.cap == 4 and q.count == -3
    (r,) = parse_pipeline("tunable{limit=1e-3}")
    assert r.limit == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "item,option_name,expected",
    [
        ("count=2.5", "count", "int"),
        ("count=many", "count", "int"),
        ("count=none", "count", "int"),
        ("ratio=half", "ratio", "float"),
        ("enabled=maybe", "enabled", "bool"),
        ("enabled=2", "enabled", "bool"),
        ("limit=big", "limit", "float or none"),
        ("cap=0.5", "cap", "int or none"),
    ],
)
def test_a_bad_value_names_the_option_and_the_expected_type(item, option_name, expected):
    register_pass(Tunable)
    with pytest.raises(OptionError) as info:
        parse_pipeline(f"tunable{{{item}}}")
    message = str(info.value)
    assert "tunable" in message
    assert f"option {option_name}=" in message
    assert f"valid {expected}" in message


def test_an_unknown_pass_lists_the_valid_names():
    register_pass(Tunable)
    with pytest.raises(OptionError) as info:
        parse_pipeline("approx_bp,aprox_bp{norms=false}")
    message = str(info.value)
    assert "'aprox_bp'" in message
    assert "approx_bp" in message.split("passes are:")[1]
    assert "tunable" in message.split("passes are:")[1]
    with pytest.raises(OptionError, match="unknown pass"):
        pass_class("nothing_like_it")


def test_an_unknown_option_lists_the_passes_options_with_their_help():
    with pytest.raises(OptionError) as info:
        parse_pipeline("approx_bp{norm=false}")
    message = str(info.value)
    assert "'approx_bp'" in message and "'norm'" in message
    for name in ("gelu", "silu", "norms"):
        assert f"{name} (" in message
    assert "replace GELU" in message  # the option's help


@pytest.mark.parametrize(
    "text",
    [
        "approx_bp{norms=false",
        "approx_bp norms=false}",
        "approx_bp}",
        "approx_bp{gelu=true}}",
        "approx_bp{gelu=true}{silu=false}",
        "approx_bp approx_bp",
        ",approx_bp",
        "approx_bp,,approx_bp",
        "1approx_bp",
        "approx-bp",
        "approx_bp{{gelu=true}}",
        "approx_bp{norms=false}x",
    ],
)
def test_malformed_specs(text):
    with pytest.raises(OptionError, match="cannot read the pass list"):
        parse_pipeline(text)


def test_an_option_without_a_value_and_an_empty_pipeline():
    with pytest.raises(OptionError, match="option 'norms' needs a value"):
        parse_pipeline("approx_bp{norms}")
    for text in ("", "   "):
        with pytest.raises(OptionError, match="no pass given") as info:
            parse_pipeline(text)
        assert "approx_bp" in str(info.value)


def test_a_value_may_contain_an_equals_sign():
    register_pass(Tunable)
    assert parse_pipeline("tunable{label=a=b}")[0].label == "a=b"


def test_a_value_the_pass_itself_refuses_is_an_option_error():
    register_pass(Validated)
    assert parse_pipeline("validated{ratio=0.75}")[0].ratio == 0.75
    with pytest.raises(OptionError, match="'validated'.*ratio must be between 0 and 1"):
        parse_pipeline("validated{ratio=3}")
    with pytest.raises(OptionError, match="'validated'"):
        make_pass("validated", {"ratio": -1.0})


# -- option values: ranges, non-finite floats, literals, repeats ----------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "options, allowed",
    [
        pytest.param(dict(count=0), "1 <= count <= 8", id="int-below"),
        pytest.param(dict(count=10**6), "1 <= count <= 8", id="int-above"),
        pytest.param(dict(count=2.5), "must be int, 1 <= count <= 8", id="int-given-float"),
        pytest.param(dict(count=True), "must be int, 1 <= count <= 8", id="int-given-bool"),
        pytest.param(dict(ratio=0), "0 < ratio <= 1", id="float-open-bound"),
        pytest.param(dict(ratio=1.5), "0 < ratio <= 1", id="float-above"),
        pytest.param(dict(ratio=NAN), "0 < ratio <= 1", id="float-nan"),
        pytest.param(dict(ratio=INF), "0 < ratio <= 1", id="float-inf"),
        pytest.param(dict(ratio="half"), "must be float, 0 < ratio <= 1", id="float-given-str"),
        pytest.param(dict(limit=NAN), "0 < limit <= inf", id="inf-allowed-nan-not"),
        pytest.param(dict(limit=-INF), "0 < limit <= inf", id="inf-allowed-minus-inf-not"),
        pytest.param(dict(size=10), "0 <= size < 10", id="union-number"),
        pytest.param(dict(size="a1"), "'a1' is not a word", id="union-text-parse"),
        pytest.param(dict(mode="slow"), "one of 'fast', 'exact'", id="literal"),
        pytest.param(dict(mode=1), "one of 'fast', 'exact'", id="literal-given-int"),
    ],
)
def test_python_option_out_of_its_range_or_values_names_pass_option_value_and_what_is_allowed(options, allowed):
    ((key, value),) = options.items()
    with pytest.raises(OptionError) as info:
        Bounded(**options)
    message = str(info.value)
    assert message.startswith(f"pass 'bounded': option {key}={value!r} ")
    assert allowed in message


def test_unbounded_numbers_are_still_finite_and_declared_bounds_hold_inside():
    with pytest.raises(OptionError, match=r"option ratio=nan must be a finite number"):
        Tunable(ratio=NAN)
    with pytest.raises(OptionError, match=r"option limit=inf must be a finite number"):
        Tunable(limit=INF)
    assert Tunable(count=-3, ratio=1e300).count == -3
    assert Bounded(limit=INF).limit == INF  # the range names infinity
    # closed bounds are inside the range; just inside the open ones is too
    Bounded(count=1, ratio=1, size=0)
    Bounded(count=8, ratio=1e-300, size=9.999)
    assert Bounded(size="word").size == "word"


@pytest.mark.parametrize(
    "item, message",
    [
        ("count=9", "option count=9 must be 1 <= count <= 8"),
        ("ratio=nan", "option ratio=nan must be 0 < ratio <= 1"),
        ("ratio=inf", "option ratio=inf must be 0 < ratio <= 1"),
        ("ratio=1e999", "option ratio=inf must be 0 < ratio <= 1"),
        ("limit=-inf", "option limit=-inf must be 0 < limit <= inf"),
        ("mode=slow", "option mode='slow' must be one of 'fast', 'exact'"),
        ("size=12 parsecs", "option size='12 parsecs' is not valid: '12 parsecs' is not a word"),
        ("count=two", "option count='two' is not a valid int, 1 <= count <= 8"),
        ("ratio=0.5,ratio=0.7", "option ratio is given twice (ratio=0.5 and ratio=0.7); give it once"),
        ("count=2, count =2", "option count is given twice"),
    ],
)
def test_spec_option_errors(item, message):
    register_pass(Bounded)
    with pytest.raises(OptionError) as info:
        parse_pipeline(f"bounded{{{item}}}")
    assert str(info.value).startswith(f"pass 'bounded': {message}")


def test_spec_values_of_a_literal_and_of_infinity_where_allowed():
    register_pass(Bounded)
    assert parse_pipeline("bounded{mode=exact,limit=inf,size=word}") == [Bounded(mode="exact", limit=INF, size="word")]
    p = Bounded(mode="exact", count=8, ratio=0.25)
    assert parse_pipeline(p.spec()) == [p]


@pytest.mark.parametrize(
    "spec, mentions",
    [
        ("remat{budget=-1}", ["option budget=-1.0 must be 0 < budget <= 1"]),
        ("remat{budget=nan}", ["option budget=nan must be 0 < budget <= 1"]),
        ("remat{budget=inf}", ["option budget=inf must be 0 < budget <= 1"]),
        ("remat{budget=1e999GB}", ["option budget='1e999GB'", "finite number of bytes"]),
        ("remat{budget=12 parsecs}", ["option budget='12 parsecs' is not valid: cannot read the size"]),
        ("remat{time_limit=nan}", ["option time_limit=nan must be 0 < time_limit <= 3600"]),
        ("remat{time_limit=0}", ["option time_limit=0.0 must be 0 < time_limit <= 3600"]),
        ("remat{intervals=1000000}", ["option intervals=1000000 must be 0 <= intervals <= 8"]),
        ("remat{intervals=2.5}", ["option intervals='2.5' is not a valid int, 0 <= intervals <= 8"]),
        ("remat{workers=-1}", ["option workers=-1 must be 0 <= workers <= 64"]),
        ("remat{graph=x}", ["option graph='x' must be one of 'training', 'inference'"]),
        ("remat{solver=checkmate}", ["solver"]),
        ("remat{cost=time}", ["option cost='time' must be one of 'flops', 'roofline', 'measured'"]),
        ("remat{budget=0.5,budget=0.7}", ["option budget is given twice (budget=0.5 and budget=0.7)"]),
    ],
)
def test_cli_option_errors_exit_2_with_one_error_line(spec, mentions, tmp_path, capsys):
    # the passes are read before the input file, so a model is not needed to refuse them
    rc = main(["run", str(tmp_path / "model.pt2"), "-p", spec, "-o", str(tmp_path / "out.pt2")])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: pass '"), err
    for text in mentions:
        assert text in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_passes_help_shows_each_options_range_or_values(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "[0 < budget <= 1]" in out and "[0 <= intervals <= 8]" in out and "[training, inference]" in out


def _numeric(cls, f) -> bool:
    return any(k in (int, float) for k in pass_infra._kinds(typing.get_type_hints(cls)[f.name]))


@pytest.mark.parametrize("name", sorted(pass_infra._BUILTIN_PASSES))
def test_every_numeric_option_of_a_builtin_pass_has_a_range_and_the_readme_shows_it(name):
    cls = pass_class(name)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split(f"### `{name}`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = cells
    assert list(rows) == [f.name for f in cls.options()], "the README's option table lists the options in order"
    for f in cls.options():
        if _numeric(cls, f):
            assert f.metadata["range"] != pass_infra.Range(), f"{name}.{f.name} has no range"
        assert allowed_text(cls, f) in rows[f.name][2].replace("`", ""), (f.name, rows[f.name])


def test_remat_cost_values_are_the_cost_models():
    from passes import Remat
    from rewrite.cost_models import COST_MODELS

    assert typing.get_args(typing.get_type_hints(Remat)["cost"]) == tuple(COST_MODELS)


# Specs near the edges: each pass with its own options (and one it lacks) set to values out of
# range, non-finite, too long for int(), sizes that overflow, stray punctuation; and plain junk.
_OPTIONS = {cls.name: [f.name for f in cls.options()] for cls in (pass_class("remat"), pass_class("approx_bp"), Bounded, Tunable)}
_VALUES = ["nan", "-nan", "inf", "-inf", "infinity", "1e999", "-1e999", "0", "-0.0", "1", "8", "9", "3600", "3601",
           "1000000", "0.5", "2.5", "true", "none", "training", "exact", "moccasin", "checkmate", "1e999GB", "1e-999B",
           "0B", "1.5GB", "1e300TB", "12 parsecs", "9" * 5000, "", "=", "1_0", " 7 "]  # fmt: skip
_number = st.one_of(st.integers().map(str), st.floats().map(repr))
_value = st.one_of(
    st.sampled_from(_VALUES),
    _number,
    st.builds("{}{}".format, _number, st.sampled_from(["B", "KB", "GiB", "TB"])),
    st.text(alphabet="0123456789.eE+-_ xnaifGBiKMT=", max_size=10),
)


@st.composite
def _spec(draw) -> str:
    name = draw(st.sampled_from([*_OPTIONS, "nope"]))
    keys = st.sampled_from([*_OPTIONS.get(name, []), "nope"])
    items = draw(st.lists(st.builds("{}={}".format, keys, _value), max_size=3))
    return name + ("{" + ",".join(items) + "}" if items or draw(st.booleans()) else "")


_pipeline = st.one_of(
    st.lists(_spec(), min_size=1, max_size=3).map(",".join),
    st.text(alphabet="remat{}=,.0123456789 nfi", max_size=30),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_pipeline)
@example(text="remat{budget=1e999GB}")  # was an OverflowError from reading the size
def test_any_spec_gives_passes_or_an_option_error(text):
    register_pass(Bounded)
    register_pass(Tunable)
    try:
        passes = resolve_passes(text)
    except OptionError:
        return
    assert passes and all(isinstance(p, Pass) for p in passes)


# -- make_pass / resolve_passes ------------------------------------------------------------


def test_make_pass_takes_python_values_as_they_are():
    register_pass(Tunable)
    p = make_pass("tunable", {"count": 5, "enabled": False, "label": "x"})
    assert p == Tunable(count=5, enabled=False, label="x")
    assert make_pass("tunable") == Tunable()
    with pytest.raises(OptionError, match="has no option 'size'"):
        make_pass("tunable", {"size": 3})


def test_resolve_passes_accepts_names_specs_and_objects():
    from passes import ApproxBP

    register_pass(Tunable)
    obj = Tunable(count=1)
    resolved = resolve_passes(["approx_bp", "tunable{count=2},approx_bp{gelu=false}", obj])
    assert resolved == [ApproxBP(), Tunable(count=2), ApproxBP(gelu=False), obj]
    assert resolved[-1] is obj
    assert resolve_passes("approx_bp{silu=false}") == [ApproxBP(silu=False)]
    assert resolve_passes(obj) == [obj]
    with pytest.raises(OptionError, match="not int"):
        resolve_passes(["approx_bp", 3])
    with pytest.raises(OptionError, match="not int"):
        resolve_passes(3)
    assert resolve_passes([]) == []


@pytest.mark.parametrize("given", [[Tunable], Tunable])
def test_a_pass_class_instead_of_an_object_says_what_to_write(given):
    with pytest.raises(OptionError, match=r"Tunable is a pass class; give an object of it, e\.g\. Tunable\(\)"):
        resolve_passes(given)


# -- Pass objects --------------------------------------------------------------------------


def test_spec_prints_only_non_default_options_and_parses_back():
    register_pass(Tunable)
    assert Tunable().spec() == "tunable"
    assert Tunable(ratio=0.5, count=3).spec() == "tunable"  # given, but equal to the defaults
    p = Tunable(enabled=False, ratio=0.125, limit=2.0, cap=None, label="z")
    assert p.spec() == "tunable{enabled=false,ratio=0.125,limit=2.0,cap=None,label=z}"
    assert parse_pipeline(p.spec()) == [p]
    q = Tunable(count=9)
    assert q.spec() == "tunable{count=9}"
    assert parse_pipeline(q.spec()) == [q]


def test_a_pass_is_a_frozen_dataclass_of_its_options():
    p = Tunable(count=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.count = 5
    assert [f.name for f in Tunable.options()] == ["enabled", "count", "ratio", "limit", "cap", "label"]
    assert Tunable.options()[1].metadata["doc"] == "how many"
    assert p.options_dict() == {"enabled": True, "count": 4, "ratio": 0.5, "limit": None, "cap": 7, "label": "plain"}
    assert Tunable.summary() == "A pass with one option of every kind."
    assert p.exact_forward and p.exact_backward
    assert Tunable(count=4) == p and hash(Tunable(count=4)) == hash(p)
    error = p.fail("something is off")
    assert isinstance(error, rewrite.PassError) and error.pass_name == "tunable"
    assert str(error) == "pass 'tunable': something is off"
    assert typing.get_type_hints(Tunable)["name"] == ClassVar[str]


def test_option_is_a_field_with_a_default_and_help():
    f = option(3, "three")
    assert f.default == 3 and f.metadata["doc"] == "three"


# -- registry ------------------------------------------------------------------------------


def test_register_pass_then_use_it_by_name_in_optimize():
    assert "gelu_counter" not in pass_names()
    assert register_pass(GeluCounter) is GeluCounter  # usable as a decorator
    assert "gelu_counter" in pass_names() and "approx_bp" in pass_names()
    assert pass_names() == sorted(pass_names())
    assert pass_class("gelu_counter") is GeluCounter

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2), nn.GELU())
    x = torch.randn(3, 4)
    result = optimize(model, ["gelu_counter{tag=found}"], (x,), mode="eval")
    report = result.report["gelu_counter"]
    assert report.figures == {"gelus": 2, "mode": "eval"}
    assert [c.detail for c in report.changes] == ["found", "found"]
    assert report.spec == "gelu_counter{tag=found}" and report.options == {"tag": "found"}
    torch.testing.assert_close(result(x), model(x))


def test_a_registered_pass_is_gone_after_the_test_that_registered_it():
    assert "gelu_counter" not in pass_names() and "tunable" not in pass_names()


def test_register_pass_refuses_what_is_not_a_named_pass():
    class NotAPass:
        name = "not_a_pass"

    @dataclass(frozen=True)
    class Nameless(Pass):
        def run(self, gm, ctx):
            return PassResult()

    for bad in (NotAPass, Nameless, Tunable(), "tunable"):
        with pytest.raises(OptionError, match="register_pass needs a Pass subclass"):
            register_pass(bad)
    assert "not_a_pass" not in pass_names()


def test_builtin_passes_are_loaded_when_first_asked_for():
    from passes import ApproxBP

    assert pass_class("approx_bp") is ApproxBP
    assert "approx_bp" in pass_names()
