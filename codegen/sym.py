"""ATen elementwise ops as sympy expressions.

Every value of a region is a ``SymValue``: a sympy expression per element plus its kind
(float, int or bool). Floats are real symbols, ints integer symbols, bools sympy booleans;
a bool used as a number becomes ``Piecewise((1, b), (0, True))``.

Functions sympy lacks, or whose derivative must follow PyTorch's autograd rather than
mathematics (casts, floor, the ties of max/min), are ``sympy.Function`` subclasses here with
their ``fdiff``; the Triton printer knows how to print each of them.

Non-smooth ops are ``Piecewise`` expressions whose branches put the points where the
derivative is undefined on the side PyTorch's autograd picks (relu'(0) = 0, clamp'(bound) = 1,
hardtanh'(bound) = 0, maximum'(tie) = 1/2 each), so sympy's derivative matches autograd.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import sympy
import torch

SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Kind(enum.Enum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"


def kind_of_dtype(dtype: torch.dtype) -> Kind:
    if dtype == torch.bool:
        return Kind.BOOL
    return Kind.FLOAT if dtype.is_floating_point else Kind.INT


@dataclass(frozen=True)
class SymValue:
    expr: sympy.Basic
    kind: Kind

    @property
    def number(self) -> sympy.Expr:
        """The value as an arithmetic expression (a bool counts as 0 or 1)."""
        if self.kind is Kind.BOOL:
            return sympy.Piecewise((sympy.Integer(1), self.expr), (sympy.Integer(0), True))
        return self.expr

    @property
    def condition(self) -> sympy.Basic:
        """The value as a boolean (a number is true when non-zero)."""
        if self.kind is Kind.BOOL:
            return self.expr
        return sympy.Ne(self.expr, 0)


# ---- functions with PyTorch's derivatives -----------------------------------------------------


class Sigmoid(sympy.Function):
    is_real = True

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class _ZeroDerivative(sympy.Function):
    """Piecewise-constant functions: autograd gives them a zero gradient everywhere."""

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class FloorF(_ZeroDerivative):
    is_real = True


class CeilF(_ZeroDerivative):
    is_real = True


class TruncF(_ZeroDerivative):
    is_real = True


class RoundF(_ZeroDerivative):
    """Round half to even, as torch.round."""

    is_real = True


class SignF(_ZeroDerivative):
    is_real = True


class IntToFloat(_ZeroDerivative):
    """An integer value used as a float: printed as a cast to the compute type."""

    is_real = True


class FloorDiv(_ZeroDerivative):
    """Python/PyTorch floor division of integers (rounds toward -inf)."""

    is_integer = True


class FloorDivF(_ZeroDerivative):
    """PyTorch's floor division of floats: derived from fmod, not floor(a / b)."""

    is_real = True


class TruncDiv(_ZeroDerivative):
    """C division of integers (rounds toward zero): ``div(rounding_mode='trunc')``."""

    is_integer = True


class PyMod(sympy.Function):
    """PyTorch remainder: the result has the sign of the divisor (Python's ``%``)."""

    def _eval_is_integer(self):
        return self.args[0].is_integer and self.args[1].is_integer

    def _eval_is_real(self):
        return True

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Integer(1) if argindex == 1 else -FloorDivF(a, b)


class PowT(sympy.Function):
    """``base ** exponent`` with a tensor exponent. Its derivatives carry autograd's masks:
    d/dbase is 0 where the exponent is 0 and d/dexponent is 0 where the base is 0 and the
    exponent is not negative (sympy's e * b**e / b and b**e * log(b) are NaN there)."""

    def _eval_is_integer(self):
        return self.args[0].is_integer and self.args[1].is_integer

    def _eval_is_real(self):
        return True

    def fdiff(self, argindex=1):
        b, e = self.args
        if argindex == 1:
            return sympy.Piecewise((0, sympy.Eq(e, 0)), (e * PowT(b, e - 1), True))
        return sympy.Piecewise((0, sympy.And(sympy.Eq(b, 0), e >= 0)), (PowT(b, e) * sympy.log(b), True))


class CFmod(sympy.Function):
    """C fmod: the result has the sign of the dividend (``torch.fmod``)."""

    def _eval_is_integer(self):
        return self.args[0].is_integer and self.args[1].is_integer

    def _eval_is_real(self):
        return True

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Integer(1) if argindex == 1 else -TruncF(a / b)


_CASTS: dict[tuple[str, str], type] = {}


def cast_function(kind: str, dtype: torch.dtype) -> type:
    """``RoundTo_float16`` (a float rounded to a narrower float; derivative 1, as autograd's
    cast) or ``ToInt_int32`` (a number converted to an integer type, truncating; derivative 0)."""
    name = str(dtype).removeprefix("torch.")
    key = (kind, name)
    if key not in _CASTS:
        if kind == "round":
            _CASTS[key] = type(
                f"RoundTo_{name}", (sympy.Function,), {"is_real": True, "dtype": dtype, "fdiff": _unit_derivative}
            )
        else:
            _CASTS[key] = type(f"ToInt_{name}", (_ZeroDerivative,), {"is_integer": True, "dtype": dtype})
    return _CASTS[key]


def _unit_derivative(self, argindex=1):
    return sympy.Integer(1)


# ---- the op table ------------------------------------------------------------------------------


def _const(value) -> SymValue:
    if isinstance(value, bool):
        return SymValue(sympy.true if value else sympy.false, Kind.BOOL)
    if isinstance(value, int):
        return SymValue(sympy.Integer(value), Kind.INT)
    if isinstance(value, float):
        if math.isnan(value):
            return SymValue(sympy.nan, Kind.FLOAT)
        if math.isinf(value):
            return SymValue(sympy.oo if value > 0 else -sympy.oo, Kind.FLOAT)
        if value == int(value) and abs(value) < 2**53:
            return SymValue(sympy.Integer(int(value)), Kind.FLOAT)
        if (2 * value) == int(2 * value) and abs(value) < 2**52:
            # Halves stay exact rationals, so x ** 0.5 prints as sqrt and 0.5 * x stays exact.
            return SymValue(sympy.Rational(int(2 * value), 2), Kind.FLOAT)
        return SymValue(sympy.Float(value, 17), Kind.FLOAT)
    raise ValueError(f"argument {value!r} is not a number")


def _v(arg) -> SymValue:
    return arg if isinstance(arg, SymValue) else _const(arg)


def _n(arg) -> sympy.Expr:
    return _v(arg).number


def _float_operand(arg) -> sympy.Expr:
    """An operand of a float op: integers become floats explicitly (true division, exp, ...)."""
    v = _v(arg)
    expr = v.number
    if v.kind is not Kind.FLOAT and not expr.is_number:
        return IntToFloat(expr)
    return expr


def _relu(x):
    # NaN fails x <= 0 and passes through, as in torch.relu; relu'(0) = 0.
    return sympy.Piecewise((0, x <= 0), (x, True))


def gelu_expression(x, approximate="none"):
    if approximate == "tanh":
        inner = sympy.sqrt(2 / sympy.pi) * (x + sympy.Float("0.044715") * x**3)
        return x / 2 * (1 + sympy.tanh(inner))
    return x / 2 * (1 + sympy.erf(x / sympy.sqrt(2)))


def _clamp(x, lo, hi):
    branches = []
    if lo is not None:
        branches.append((_n(lo), x < _n(lo)))
    if hi is not None:
        branches.append((_n(hi), x > _n(hi)))
    return sympy.Piecewise(*branches, (x, True)) if branches else x


def _maximum(a, b, larger=True):
    a, b = _n(a), _n(b)
    first = a > b if larger else a < b
    second = a < b if larger else a > b
    return sympy.Piecewise((a, first), (b, second), ((a + b) / 2, True))


def _hardtanh(x, lo=-1.0, hi=1.0):
    return sympy.Piecewise((_n(lo), x <= _n(lo)), (_n(hi), x >= _n(hi)), (x, True))


def _softplus(x, beta=1.0, threshold=20.0):
    bx = _n(beta) * x
    return sympy.Piecewise((x, bx > _n(threshold)), (sympy.log(1 + sympy.exp(bx)) / _n(beta), True))


def _divide(a, b, rounding_mode=None):
    va, vb = _v(a), _v(b)
    if rounding_mode is None:
        return _float_operand(va) / _float_operand(vb)
    if va.kind is not Kind.FLOAT and vb.kind is not Kind.FLOAT:
        return (FloorDiv if rounding_mode == "floor" else TruncDiv)(va.number, vb.number)
    if rounding_mode == "floor":
        return FloorDivF(_float_operand(va), _float_operand(vb))
    return TruncF(_float_operand(va) / _float_operand(vb))


def _to_copy(x, dtype=None, **_):
    v = _v(x)
    if dtype is None:
        return v
    target = kind_of_dtype(dtype)
    if target is Kind.BOOL:
        return SymValue(v.condition, Kind.BOOL)
    if target is Kind.INT:
        if v.kind is Kind.BOOL:
            return SymValue(v.number, Kind.INT)
        return SymValue(cast_function("int", dtype)(v.number), Kind.INT)
    if v.kind is not Kind.FLOAT:
        return SymValue(_float_operand(v), Kind.FLOAT)
    # Rounding to float32 is a no-op for float16/bfloat16/float32 sources: only a narrower
    # target than what the value may hold is a real rounding step.
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return SymValue(cast_function("round", dtype)(v.expr), Kind.FLOAT)
    return v


def _where(cond, a, b):
    return sympy.Piecewise((_n(a), _v(cond).condition), (_n(b), True))


def _cmp(relation):
    return lambda a, b: SymValue(relation(_n(a), _n(b)), Kind.BOOL)


def _logical(fn):
    return lambda *args: SymValue(fn(*(_v(a).condition for a in args)), Kind.BOOL)


def _bitwise(fn):
    def build(*args):
        values = [_v(a) for a in args]
        if any(v.kind is not Kind.BOOL for v in values):
            raise ValueError("bitwise ops are supported on bool masks only")
        return SymValue(fn(*(v.expr for v in values)), Kind.BOOL)

    return build


def _pow(base, exponent):
    e = _v(exponent)
    b = _v(base)
    if not e.expr.is_number:
        return PowT(_float_operand(b) if e.kind is Kind.FLOAT else b.number, e.number)
    if e.kind is Kind.FLOAT and e.expr.is_number and not e.expr.is_integer:
        return _float_operand(b) ** e.expr
    if b.kind is not Kind.FLOAT and e.kind is not Kind.FLOAT and e.expr.is_number and e.expr < 0:
        raise ValueError("integers to negative integer powers are not allowed (PyTorch refuses them too)")
    return b.number**e.number


def _float1(fn):
    """A float function of one float operand (ints are converted first)."""
    return lambda x, *rest, **kw: fn(_float_operand(x), *rest, **kw)


# op name -> builder(args..., **kwargs) -> sympy expr (or SymValue for bool results)
POINTWISE_OPS = {
    "aten.add.Tensor": lambda a, b, alpha=1: _n(a) + _n(alpha) * _n(b),
    "aten.add.Scalar": lambda a, b, alpha=1: _n(a) + _n(alpha) * _n(b),
    "aten.sub.Tensor": lambda a, b, alpha=1: _n(a) - _n(alpha) * _n(b),
    "aten.sub.Scalar": lambda a, b, alpha=1: _n(a) - _n(alpha) * _n(b),
    "aten.rsub.Scalar": lambda a, b, alpha=1: _n(b) - _n(alpha) * _n(a),
    "aten.rsub.Tensor": lambda a, b, alpha=1: _n(b) - _n(alpha) * _n(a),
    "aten.mul.Tensor": lambda a, b: _n(a) * _n(b),
    "aten.mul.Scalar": lambda a, b: _n(a) * _n(b),
    "aten.div.Tensor": _divide,
    "aten.div.Scalar": _divide,
    "aten.div.Tensor_mode": _divide,
    "aten.div.Scalar_mode": _divide,
    "aten.floor_divide.default": lambda a, b: _divide(a, b, "floor"),
    "aten.floor_divide.Scalar": lambda a, b: _divide(a, b, "floor"),
    "aten.remainder.Tensor": lambda a, b: PyMod(_n(a), _n(b)),
    "aten.remainder.Scalar": lambda a, b: PyMod(_n(a), _n(b)),
    "aten.fmod.Tensor": lambda a, b: CFmod(_n(a), _n(b)),
    "aten.fmod.Scalar": lambda a, b: CFmod(_n(a), _n(b)),
    "aten.neg.default": lambda x: -_n(x),
    "aten.reciprocal.default": _float1(lambda x: 1 / x),
    "aten.abs.default": lambda x: sympy.Abs(_n(x)),
    "aten.sign.default": lambda x: SignF(_n(x)),
    "aten.square.default": lambda x: _n(x) ** 2,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.pow.Tensor_Tensor": _pow,
    "aten.pow.Scalar": _pow,
    "aten.sqrt.default": _float1(sympy.sqrt),
    "aten.rsqrt.default": _float1(lambda x: 1 / sympy.sqrt(x)),
    "aten.exp.default": _float1(sympy.exp),
    "aten.exp2.default": _float1(lambda x: 2**x),
    "aten.log.default": _float1(sympy.log),
    "aten.log2.default": _float1(lambda x: sympy.log(x) / sympy.log(2)),
    "aten.log10.default": _float1(lambda x: sympy.log(x) / sympy.log(10)),
    "aten.sin.default": _float1(sympy.sin),
    "aten.cos.default": _float1(sympy.cos),
    "aten.tanh.default": _float1(sympy.tanh),
    "aten.erf.default": _float1(sympy.erf),
    "aten.sigmoid.default": _float1(Sigmoid),
    "aten.floor.default": lambda x: FloorF(_n(x)) if _v(x).kind is Kind.FLOAT else _n(x),
    "aten.ceil.default": lambda x: CeilF(_n(x)) if _v(x).kind is Kind.FLOAT else _n(x),
    "aten.trunc.default": lambda x: TruncF(_n(x)) if _v(x).kind is Kind.FLOAT else _n(x),
    "aten.round.default": lambda x: RoundF(_n(x)) if _v(x).kind is Kind.FLOAT else _n(x),
    "aten.relu.default": lambda x: _relu(_n(x)),
    "aten.gelu.default": _float1(gelu_expression),
    "aten.silu.default": _float1(lambda x: x * Sigmoid(x)),
    "aten.mish.default": _float1(lambda x: x * sympy.tanh(sympy.log(1 + sympy.exp(x)))),
    "aten.softplus.default": _float1(_softplus),
    "aten.leaky_relu.default": lambda x, slope=0.01: sympy.Piecewise((_n(slope) * _n(x), _n(x) <= 0), (_n(x), True)),
    "aten.elu.default": lambda x, alpha=1.0, scale=1.0, input_scale=1.0: sympy.Piecewise(
        (_n(scale) * _n(alpha) * (sympy.exp(_n(input_scale) * _n(x)) - 1), _n(x) <= 0),
        (_n(scale) * _n(x), True),
    ),
    "aten.hardtanh.default": lambda x, lo=-1.0, hi=1.0: _hardtanh(_n(x), lo, hi),
    "aten.hardsigmoid.default": lambda x: _hardtanh(_n(x) / 6 + sympy.Rational(1, 2), 0, 1),
    "aten.hardswish.default": lambda x: _n(x)
    * sympy.Piecewise((0, _n(x) <= -3), (1, _n(x) >= 3), (_n(x) / 6 + sympy.Rational(1, 2), True)),
    "aten.clamp.default": lambda x, lo=None, hi=None: _clamp(_n(x), lo, hi),
    "aten.clamp_min.default": lambda x, lo: _clamp(_n(x), lo, None),
    "aten.clamp_max.default": lambda x, hi: _clamp(_n(x), None, hi),
    "aten.maximum.default": lambda a, b: _maximum(a, b, larger=True),
    "aten.minimum.default": lambda a, b: _maximum(a, b, larger=False),
    "aten.where.self": _where,
    "aten.where.ScalarSelf": _where,
    "aten.where.ScalarOther": _where,
    "aten.where.Scalar": _where,
    "aten.lerp.Scalar": lambda a, b, w: _n(a) + _n(w) * (_n(b) - _n(a)),
    "aten.lerp.Tensor": lambda a, b, w: _n(a) + _n(w) * (_n(b) - _n(a)),
    "aten.addcmul.default": lambda s, a, b, value=1: _n(s) + _n(value) * _n(a) * _n(b),
    "aten.addcdiv.default": lambda s, a, b, value=1: _n(s) + _n(value) * _n(a) / _n(b),
    "aten.gt.Tensor": _cmp(sympy.Gt),
    "aten.gt.Scalar": _cmp(sympy.Gt),
    "aten.ge.Tensor": _cmp(sympy.Ge),
    "aten.ge.Scalar": _cmp(sympy.Ge),
    "aten.lt.Tensor": _cmp(sympy.Lt),
    "aten.lt.Scalar": _cmp(sympy.Lt),
    "aten.le.Tensor": _cmp(sympy.Le),
    "aten.le.Scalar": _cmp(sympy.Le),
    "aten.eq.Tensor": _cmp(sympy.Eq),
    "aten.eq.Scalar": _cmp(sympy.Eq),
    "aten.ne.Tensor": _cmp(sympy.Ne),
    "aten.ne.Scalar": _cmp(sympy.Ne),
    "aten.logical_and.default": _logical(sympy.And),
    "aten.logical_or.default": _logical(sympy.Or),
    "aten.logical_xor.default": _logical(sympy.Xor),
    "aten.logical_not.default": _logical(sympy.Not),
    "aten.bitwise_and.Tensor": _bitwise(sympy.And),
    "aten.bitwise_or.Tensor": _bitwise(sympy.Or),
    "aten.bitwise_xor.Tensor": _bitwise(sympy.Xor),
    "aten.bitwise_not.default": _bitwise(sympy.Not),
    "aten._to_copy.default": _to_copy,
    "aten.clone.default": lambda x: _v(x),
}


class _Raw(sympy.Function):
    """Arithmetic sympy may not simplify: ``x - x`` is NaN for infinite x, ``x * 0`` is NaN
    for infinite or NaN x, ``x / x`` is NaN for 0 and infinities. Used only where automatic
    simplification would have cancelled an operand; printed as the plain operator."""

    is_real = True

    def _eval_is_integer(self):
        return all(a.is_integer for a in self.args) and type(self) is not RawDiv


class RawAdd(_Raw):
    def fdiff(self, argindex=1):
        return sympy.Integer(1)


class RawMul(_Raw):
    def fdiff(self, argindex=1):
        a, b = self.args
        return b if argindex == 1 else a


class RawDiv(_Raw):
    def fdiff(self, argindex=1):
        a, b = self.args
        return 1 / b if argindex == 1 else -a / b**2


_ARITHMETIC_UNEVALUATED = {
    "aten.add.Tensor": lambda a, b, alpha=1: RawAdd(a, _n(alpha) * b),
    "aten.sub.Tensor": lambda a, b, alpha=1: RawAdd(a, -_n(alpha) * b),
    "aten.mul.Tensor": lambda a, b: RawMul(a, b),
    "aten.mul.Scalar": lambda a, b: RawMul(a, b),
    "aten.div.Tensor": lambda a, b: RawDiv(a, b),
}


def pointwise_expression(op: str, args: list, kwargs: dict, out_dtype: torch.dtype) -> SymValue:
    """The expression of one step; its kind comes from the dtype PyTorch gives the result."""
    if out_dtype.is_complex:
        raise ValueError(f"complex results ({out_dtype}) are not supported")
    for a in args:
        if isinstance(a, (list, tuple)):
            raise ValueError("list arguments are not elementwise")
    kind = kind_of_dtype(out_dtype)
    if kind is Kind.FLOAT and op not in _SELECTS:
        # PyTorch converts integer operands to the float result type before the arithmetic
        # (int8 * 2.0 is 200.0, not an int8 product that wrapped).
        args = [_as_float_value(a) for a in args]
    result = POINTWISE_OPS[op](*args, **kwargs)
    if kind is Kind.FLOAT and not isinstance(result, SymValue):
        result = _keep_cancelled_operands(op, args, kwargs, result)
    if isinstance(result, SymValue):
        if result.kind is kind:
            return result
        return _to_copy(result, out_dtype)
    if kind is Kind.BOOL:
        return SymValue(sympy.Ne(result, 0), Kind.BOOL)
    if kind is Kind.FLOAT and result.is_integer and not result.is_number:
        result = IntToFloat(result)
    return SymValue(result, kind)


_SELECTS = {"aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar"}


def _as_float_value(arg):
    if isinstance(arg, SymValue) and arg.kind is not Kind.FLOAT:
        return SymValue(_float_operand(arg), Kind.FLOAT)
    return arg


def _keep_cancelled_operands(op: str, args, kwargs, result):
    """sympy cancels x - x, x * 0 and x / x on construction, which is wrong for inf and NaN
    (and 0 / 0): where an operand vanished from a float arithmetic step, keep the operation."""
    operands = set().union(*(_v(a).number.free_symbols for a in args if isinstance(a, SymValue)))
    if op in _ARITHMETIC_UNEVALUATED and operands - result.free_symbols:
        return _ARITHMETIC_UNEVALUATED[op](*(_n(a) for a in args), **kwargs)
    return result
