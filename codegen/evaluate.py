"""Evaluate the sympy expressions of a region with PyTorch ops: the reference backward.

The backward kernel is printed from ``backward_program``'s assignments; this evaluates the
same assignments op by op with PyTorch, in the same compute type. It is what
``rewrite.pointwise_backward`` runs where there are no kernels, and it is traceable (plain
ATen ops), so ``torch.compile`` and export see a backward that reads exactly the inputs the
kernel reads. Tests hold both against eager autograd of the original region.
"""

from __future__ import annotations

import functools
import operator

import sympy
import torch



def evaluate(exprs, env: dict, compute: torch.dtype) -> list:
    """Values of ``exprs`` given tensors (or numbers) for their free symbols in ``env``."""
    memo: dict = {}

    def value(e):
        if e in env:
            return env[e]
        if e in memo:
            return memo[e]
        result = _evaluate(e, value, compute)
        memo[e] = result
        return result

    return [value(e) for e in exprs]


def _number(e):
    if e is sympy.nan or e is sympy.zoo or e.is_extended_real is False:
        return float("nan")
    if e in (sympy.oo, -sympy.oo):
        return float("inf") if e is sympy.oo else float("-inf")
    return int(e) if e.is_integer else float(e)


def _tensor(v):
    return v if isinstance(v, torch.Tensor) else torch.tensor(v)


def _where(cond, a, b):
    if not isinstance(cond, torch.Tensor):
        return a if cond else b
    return torch.where(cond, a, b)


_UNARY = {
    "exp": torch.exp,
    "log": torch.log,
    "sin": torch.sin,
    "cos": torch.cos,
    "erf": torch.erf,
    "tanh": torch.tanh,
    "Abs": torch.abs,
    "Sigmoid": torch.sigmoid,
    "FloorF": torch.floor,
    "CeilF": torch.ceil,
    "TruncF": torch.trunc,
    "RoundF": torch.round,
    "SignF": torch.sign,
    "sign": torch.sign,
}

_BINARY = {
    "FloorDiv": torch.floor_divide,
    "FloorDivF": torch.floor_divide,
    "TruncDiv": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "PyMod": torch.remainder,
    "CFmod": torch.fmod,
    "PowT": lambda b, e: torch.pow(b, e),
    "RawAdd": operator.add,
    "RawMul": operator.mul,
    "RawDiv": operator.truediv,
}

_RELATIONS = {
    "StrictGreaterThan": operator.gt,
    "GreaterThan": operator.ge,
    "StrictLessThan": operator.lt,
    "LessThan": operator.le,
    "Equality": operator.eq,
    "Unequality": operator.ne,
}


def _evaluate(e, value, compute):
    if isinstance(e, sympy.logic.boolalg.BooleanAtom):
        return bool(e)
    if e.is_number and not isinstance(e, sympy.Piecewise):
        return _number(e)
    name = type(e).__name__
    args = e.args
    if name == "Add":
        return functools.reduce(operator.add, (value(a) for a in args))
    if name == "Mul":
        return functools.reduce(operator.mul, (value(a) for a in args))
    if name == "Pow":
        base, exponent = value(args[0]), value(args[1])
        if isinstance(base, torch.Tensor) or isinstance(exponent, torch.Tensor):
            return torch.pow(_tensor(base) if not isinstance(base, torch.Tensor) else base, exponent)
        return base**exponent
    if name in _UNARY:
        operand = value(args[0])
        if not isinstance(operand, torch.Tensor):
            operand = torch.tensor(operand, dtype=compute)
        return _UNARY[name](operand)
    if name in _BINARY:
        return _BINARY[name](value(args[0]), value(args[1]))
    if name == "IntToFloat":
        return _tensor(value(args[0])).to(compute)
    if name.startswith("RoundTo_"):
        return _tensor(value(args[0])).to(type(e).dtype).to(compute)
    if name.startswith("ToInt_"):
        return _tensor(value(args[0])).to(type(e).dtype)
    if name == "Piecewise":
        pieces = list(args)
        result = value(pieces[-1].expr) if pieces[-1].cond == sympy.true else float("nan")
        if pieces[-1].cond == sympy.true:
            pieces = pieces[:-1]
        for piece in reversed(pieces):
            result = _where(value(piece.cond), value(piece.expr), result)
        return result
    if name in _RELATIONS:
        return _RELATIONS[name](value(args[0]), value(args[1]))
    if name == "And":
        return functools.reduce(torch.logical_and, (_tensor(value(a)) for a in args))
    if name == "Or":
        return functools.reduce(torch.logical_or, (_tensor(value(a)) for a in args))
    if name == "Xor":
        return functools.reduce(torch.logical_xor, (_tensor(value(a)) for a in args))
    if name == "Not":
        return torch.logical_not(_tensor(value(args[0])))
    raise ValueError(f"cannot evaluate {name}: {e}")
