"""Print sympy expressions as Triton code.

Triton's ``//`` and ``%`` follow C (truncate toward zero; the remainder takes the dividend's
sign) while PyTorch's ``floor_divide`` and ``remainder`` follow Python (round toward -inf;
the remainder takes the divisor's sign): the printer emits the correction, and plain ``//``
and ``%`` only where sympy knows both operands are non-negative.

Floats are computed in the kernel's compute type (float32, or float64 for float64 regions):
float literals in float64 code are typed explicitly (a bare Python float in Triton is a
float32 constant, which would round 0.1 before it meets a float64 tensor).

``TritonPrinter.print`` returns a Triton expression and may first append statements to
``lines`` (a sub-expression needed more than once, e.g. a Pow base or a remainder's
operands, is bound to a temporary rather than printed twice).
"""

from __future__ import annotations

import math

import sympy
import torch

TL_DTYPES = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.bool: "tl.int1",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
}

# Helpers a kernel may call; only those a kernel uses are emitted into its source.
HELPERS = {
    "_tanh": '''
@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|): no overflow, no cancellation near 0 in the sign.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
''',
    "_trunc": '''
@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))
''',
    "_round_half_even": '''
@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    f_is_even = (f - 2.0 * tl.floor(f * 0.5)) == 0
    r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(f_is_even, f, f + 1.0)))
    return tl.where(r == 0, x * 0.0, r)  # -0.3 rounds to -0.0, as torch.round
''',
    "_floordiv_int": '''
@triton.jit
def _floordiv_int(a, b):
    # Triton's // truncates (C); PyTorch's floor division rounds toward -inf.
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)
''',
    "_remainder_int": '''
@triton.jit
def _remainder_int(a, b):
    # Triton's % takes the dividend's sign (C); PyTorch's remainder takes the divisor's.
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
''',
    "_floordiv_float": '''
@triton.jit
def _floordiv_float(a, b):
    # PyTorch's floor division of floats: from fmod (Triton's float % is C's fmod), so that
    # 1.0 // 0.1 is 9 as in PyTorch, not floor(1.0 / 0.1) = 10.
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    floordiv = tl.floor(div)
    floordiv = tl.where(div - floordiv > 0.5, floordiv + 1.0, floordiv)
    floordiv = tl.where(div == 0, 0.0 * (a / b), floordiv)
    return tl.where(b == 0, a / b, floordiv)
''',
    "_remainder_float": '''
@triton.jit
def _remainder_float(a, b):
    # PyTorch's remainder of floats: fmod, moved to the divisor's sign.
    mod = a % b
    return tl.where((mod != 0) & ((b < 0) != (mod < 0)), mod + b, mod)
''',
    "_ipow": '''
@triton.jit
def _ipow(b, e):
    # Integer power by squaring over the exponent's bits: exact, unlike exp(e * log(b)).
    r = b * 0 + 1
    base = b
    k = e
    for _ in tl.static_range(63):
        r = tl.where((k & 1) != 0, r * base, r)
        k = k >> 1
        base = base * base
    # Negative exponents of integers: 1 and -1 have an integer power, the rest truncate to 0.
    negative = tl.where(b == 1, 1, tl.where(b == -1, tl.where((e & 1) != 0, -1, 1), 0))
    return tl.where(e < 0, negative, r)
''',
    "_pow": '''
@triton.jit
def _pow(b, e):
    # b ** e for floats, as torch.pow: a negative base with an integral exponent is real.
    r = tl.exp(e * tl.log(tl.abs(b)))
    e_integral = tl.floor(e) == e
    half = e * 0.5
    e_odd = tl.where(e_integral, tl.floor(half) != half, False)
    r = tl.where(b < 0, tl.where(e_odd, -r, tl.where(e_integral, r, float("nan"))), r)
    return tl.where(e == 0, 1.0, r)
''',
}


_RELATIONS = {
    "StrictGreaterThan": ">",
    "GreaterThan": ">=",
    "StrictLessThan": "<",
    "LessThan": "<=",
    "Equality": "==",
    "Unequality": "!=",
}


class TritonPrinter:
    def __init__(self, compute_dtype: torch.dtype, temp_prefix: str = "p"):
        self.compute = TL_DTYPES[compute_dtype]
        self.float64 = compute_dtype == torch.float64
        self.lines: list[str] = []
        self.helpers: set[str] = set()
        self._temp_prefix = temp_prefix
        self._temps = 0

    # ---- entry points -------------------------------------------------------------------

    def print(self, expr) -> str:
        if isinstance(expr, sympy.logic.boolalg.BooleanAtom):
            return "True" if bool(expr) else "False"
        if isinstance(expr, sympy.Basic) and expr.is_number and not isinstance(expr, sympy.Piecewise):
            return self.number(expr)
        handler = getattr(self, f"_print_{type(expr).__name__}", None)
        if handler is None:
            for cls in type(expr).__mro__:
                handler = getattr(self, f"_print_{cls.__name__}", None)
                if handler is not None:
                    break
        if handler is None:
            raise ValueError(f"the Triton printer cannot print {type(expr).__name__}: {expr}")
        return handler(expr)

    def bind(self, expr) -> str:
        """The expression as a name: a symbol stays, anything else becomes a temporary."""
        text = self.print(expr)
        if text.isidentifier():
            return text
        self._temps += 1
        name = f"{self._temp_prefix}{self._temps}"
        self.lines.append(f"{name} = {text}")
        return name

    def number(self, expr, as_float: bool = False) -> str:
        if expr is sympy.nan or expr is sympy.zoo or expr.is_extended_real is False:
            return self.float_literal(math.nan)
        if expr in (sympy.oo, -sympy.oo):
            return self.float_literal(math.inf if expr is sympy.oo else -math.inf)
        if expr.is_integer and not as_float:
            return str(int(expr))
        return self.float_literal(float(expr))

    def float_literal(self, value: float) -> str:
        if math.isnan(value) or math.isinf(value):
            text = f'float("{value}")'
        else:
            text = repr(value)
        if self.float64:
            return f"tl.full([], {text}, tl.float64)"
        return text

    # ---- atoms --------------------------------------------------------------------------

    def _print_Symbol(self, expr):
        return expr.name

    # ---- arithmetic ---------------------------------------------------------------------

    def _print_Add(self, expr):
        terms = []
        for term in sympy.Add.make_args(expr):
            coeff, rest = term.as_coeff_Mul()
            if term.is_number and term.is_extended_real and term < 0:
                terms.append(("-", self.number(-term, as_float=not expr.is_integer)))
            elif coeff.is_number and coeff < 0 and rest != 1:
                terms.append(("-", self.print(-term)))
            else:
                terms.append(("+", self._operand(term, as_float=not expr.is_integer)))
        terms.sort(key=lambda t: t[0] == "-")  # a0 - 10, never -10 + a0 (unsigned a0 takes no negative literal)
        text = terms[0][1] if terms[0][0] == "+" else f"-{terms[0][1]}"
        for sign, t in terms[1:]:
            text += f" {sign} {t}"
        return f"({text})"

    def _operand(self, value, as_float: bool) -> str:
        """A number typed for the expression it sits in (2.0 in float code), else the value."""
        return self.number(value, as_float=as_float) if value.is_number else self.print(value)

    def _print_Mul(self, expr):
        float_result = not expr.is_integer
        constant = sympy.Integer(1)
        numerator, denominator = [], []
        for factor in sympy.Mul.make_args(expr):
            if factor.is_number:
                constant *= factor
            elif factor.is_Pow and factor.exp.is_number and factor.exp < 0:
                denominator.append(factor.base ** (-factor.exp))
            else:
                numerator.append(factor)
        texts = [self.print(f) for f in numerator]
        if float_result and numerator and all(f.is_integer for f in numerator):
            texts = [f"({' * '.join(texts)}).to({self.compute})"]  # true division of integers
        sign = ""
        if constant == -1:
            sign = "-"
        elif constant != 1:
            texts.insert(0, self.number(constant, as_float=float_result))
        num = " * ".join(texts) if texts else self.number(sympy.Integer(1), as_float=float_result)
        if denominator:
            den = " * ".join(self.print(d) for d in denominator)
            num = f"{num} / ({den})" if len(denominator) > 1 else f"{num} / {den}"
        return f"({sign}{num})"

    def _print_Pow(self, expr):
        base, exp = expr.base, expr.exp
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self.print(base)})"
        if exp == sympy.Rational(-1, 2):
            return f"tl.rsqrt({self.print(base)})"
        if exp.is_Integer:
            n = int(exp)
            if n == 0:
                return self.number(sympy.Integer(1), as_float=not base.is_integer)
            power = self._integer_power(base, abs(n))
            if n > 0:
                return power
            return f"({self.float_literal(1.0)} / {power})"
        if expr.is_integer or (base.is_integer and exp.is_integer):
            self.helpers.add("_ipow")
            return f"_ipow({self._int_operand(base)}, {self._int_operand(exp)})"
        if base.is_number:
            # c ** x = exp(x * ln c) for a positive constant base.
            if base > 0:
                return f"tl.exp({self.print(exp)} * {self.float_literal(float(sympy.log(base)))})"
        self.helpers.add("_pow")
        return f"_pow({self._as_float(base)}, {self._as_tensor(exp)})"

    def _print_PowT(self, expr):
        base, exp = expr.args
        if expr.is_integer:
            self.helpers.add("_ipow")
            return f"_ipow({self._int_operand(base)}, {self._int_operand(exp)})"
        if base.is_number and base > 0:
            return f"tl.exp({self._as_float(exp)} * {self.float_literal(float(sympy.log(base)))})"
        self.helpers.add("_pow")
        return f"_pow({self._as_tensor(base)}, {self._as_tensor(exp)})"

    def _integer_power(self, base, n: int) -> str:
        """base ** n by repeated squaring, binding the base so it is computed once."""
        square = self.bind(base)
        factors = []
        while True:
            if n & 1:
                factors.append(square)
            n >>= 1
            if not n:
                break
            square = self.bind_text(f"{square} * {square}")
        return factors[0] if len(factors) == 1 else "(" + " * ".join(factors) + ")"

    def bind_text(self, text: str) -> str:
        self._temps += 1
        name = f"{self._temp_prefix}{self._temps}"
        self.lines.append(f"{name} = {text}")
        return name

    def _int_operand(self, expr) -> str:
        if expr.is_number:
            return f"tl.full([], {int(expr)}, tl.int64)"
        return self.print(expr)

    def _as_tensor(self, expr) -> str:
        """A float operand that must be a tensor even when it is a constant."""
        if expr.is_number:
            return f"tl.full([], {self.number(expr, as_float=True)}, {self.compute})"
        return self._as_float(expr)

    def _as_float(self, expr) -> str:
        text = self.print(expr)
        if expr.is_number:
            return self.number(expr, as_float=True)
        return f"({text}).to({self.compute})" if expr.is_integer else text

    # ---- functions ----------------------------------------------------------------------

    def _call(self, fn, expr):
        return f"{fn}({self._as_float(expr.args[0])})"

    def _print_exp(self, expr):
        return self._call("tl.exp", expr)

    def _print_log(self, expr):
        return self._call("tl.log", expr)

    def _print_sin(self, expr):
        return self._call("tl.sin", expr)

    def _print_cos(self, expr):
        return self._call("tl.cos", expr)

    def _print_erf(self, expr):
        return self._call("tl.erf", expr)

    def _print_tanh(self, expr):
        self.helpers.add("_tanh")
        return self._call("_tanh", expr)

    def _print_Sigmoid(self, expr):
        return self._call("tl.sigmoid", expr)

    def _print_Abs(self, expr):
        return f"tl.abs({self.print(expr.args[0])})"

    def _print_FloorF(self, expr):
        return self._call("tl.floor", expr)

    def _print_CeilF(self, expr):
        return self._call("tl.ceil", expr)

    def _print_TruncF(self, expr):
        self.helpers.add("_trunc")
        return self._call("_trunc", expr)

    def _print_RoundF(self, expr):
        self.helpers.add("_round_half_even")
        return self._call("_round_half_even", expr)

    def _print_SignF(self, expr):
        x = self.bind(expr.args[0])
        one, zero = ("1", "0") if expr.args[0].is_integer else (self.float_literal(1.0), self.float_literal(0.0))
        return f"tl.where({x} > 0, {one}, tl.where({x} < 0, -{one}, {zero}))"

    _print_sign = _print_SignF

    def _print_IntToFloat(self, expr):
        return f"({self.print(expr.args[0])}).to({self.compute})"

    def _print_FloorDiv(self, expr):
        a, b = expr.args
        if a.is_nonnegative and b.is_nonnegative:
            return f"({self.print(a)} // {self.print(b)})"
        self.helpers.add("_floordiv_int")
        return f"_floordiv_int({self.print(a)}, {self.print(b)})"

    def _print_TruncDiv(self, expr):
        a, b = expr.args
        return f"({self.print(a)} // {self.print(b)})"  # Triton's integer // is C's

    def _print_PyMod(self, expr):
        a, b = expr.args
        if expr.is_integer:
            if a.is_nonnegative and b.is_nonnegative:
                return f"({self.print(a)} % {self.print(b)})"
            self.helpers.add("_remainder_int")
            return f"_remainder_int({self.print(a)}, {self.print(b)})"
        self.helpers.add("_remainder_float")
        return f"_remainder_float({self._as_tensor(a)}, {self._as_tensor(b)})"

    def _print_FloorDivF(self, expr):
        self.helpers.add("_floordiv_float")
        a, b = expr.args
        return f"_floordiv_float({self._as_tensor(a)}, {self._as_tensor(b)})"

    def _print_CFmod(self, expr):
        a, b = expr.args
        return f"({self.print(a)} % {self.print(b)})"  # Triton's % is C's fmod, ints and floats

    def _raw(self, expr, op: str) -> str:
        a, b = (self._operand(x, as_float=not expr.is_integer) for x in expr.args)
        return f"({a} {op} {b})"

    def _print_RawAdd(self, expr):
        return self._raw(expr, "+")

    def _print_RawMul(self, expr):
        return self._raw(expr, "*")

    def _print_RawDiv(self, expr):
        return self._raw(expr, "/")

    def _print_Function(self, expr):
        cls = type(expr)
        name = cls.__name__
        if name.startswith("RoundTo_"):
            if cls.dtype.itemsize * 8 >= (64 if self.float64 else 32):
                return self.print(expr.args[0])  # rounding to the compute type (or wider) is a no-op
            return f"({self._as_float(expr.args[0])}).to({TL_DTYPES[cls.dtype]}).to({self.compute})"
        if name.startswith("ToInt_"):
            return f"({self.print(expr.args[0])}).to({TL_DTYPES[cls.dtype]})"
        raise ValueError(f"the Triton printer cannot print the function {name}")

    # ---- conditions ---------------------------------------------------------------------

    def _print_Piecewise(self, expr):
        as_float = not expr.is_integer
        branches = list(expr.args)
        default = None
        if branches and branches[-1].cond == sympy.true:
            default = branches.pop().expr
        text = self._operand(default, as_float) if default is not None else self.float_literal(math.nan)
        for value, cond in reversed(branches):
            text = f"tl.where({self.print(cond)}, {self._operand(value, as_float)}, {text})"
        return text

    def _print_Relational(self, expr):
        return f"({self.print(expr.lhs)} {_RELATIONS[type(expr).__name__]} {self.print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self.print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self.print(a) for a in expr.args) + ")"

    def _print_Xor(self, expr):
        return "(" + " ^ ".join(self.print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"({self.print(expr.args[0])} == 0)"


def helper_source(names) -> str:
    return "".join(HELPERS[name] for name in sorted(names))
