"""A template's cost rule: a tiny arithmetic language, parsed with ``ast`` and walked with an allow-list.

    rule   := numbers, parameter names, + - * /, unary -, ( ), ceil(x), floor(x), min(a, b, …), max(a, b, …)

Nothing is ever handed to ``eval``: the source is parsed into Python's AST, every node is checked against the
allow-list above at load time (anything else, an attribute, a call to another name, ``**``, a comparison, a
string, is refused with the offending piece of text), and evaluation walks that tree.

Arithmetic is exact (``fractions.Fraction``): ``ceil(0.1 * 30)`` is 3, not the 4 that binary floats give. A rule
must be whole-valued by construction, which is checked when it is loaded: ``/`` and ``number`` parameters make a
fraction, and only ``ceil``/``floor`` turn one back into a whole number, so ``steps / 20`` is refused at load and
``ceil(steps / 20)`` is accepted. At submit time the result must be an integer from 0 to 2^53 (a safe integer for
every JSON client); a rule that gives a negative cost, or divides by zero, for some parameters refuses the task.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["MAX_COST", "MAX_RULE_LENGTH", "CostError", "CostRule"]

MAX_COST = 2**53  # credits; every amount in the ledger stays a safe integer for JSON clients
MAX_RULE_LENGTH = 1000  # characters of one rule
MAX_RULE_DEPTH = 32  # nesting of one rule (parentheses and calls), well below Python's recursion limit
FUNCTIONS: Mapping[str, tuple[int, int | None]] = {"ceil": (1, 1), "floor": (1, 1), "min": (2, None), "max": (2, None)}
_WHOLE = {"ceil", "floor"}  # functions whose result is whole whatever their argument

Number = Fraction  # what rules compute with (exact)


class CostError(ValueError):
    """A rule that cannot be loaded, or cannot price these parameters; the message says why."""


@dataclass(frozen=True, slots=True)
class CostRule:
    """A parsed, checked rule. ``evaluate(params)`` gives the integer cost of one task."""

    text: str
    _tree: ast.expr
    names: frozenset[str]  # the parameters it reads

    @classmethod
    def parse(cls, text: object, whole: Mapping[str, bool]) -> CostRule:
        """Parse and check ``text``. ``whole`` maps each parameter the rule may read to whether its values are
        whole numbers (integer, boolean, an enum of integers) or may be fractions (number)."""
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise CostError(f"must be an expression in a string, not {type(text).__name__}")
        text = str(text).strip()
        if not text:
            raise CostError("is empty")
        if len(text) > MAX_RULE_LENGTH:
            raise CostError(f"is longer than {MAX_RULE_LENGTH} characters")
        try:
            tree = ast.parse(text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            raise CostError(f"{text!r} is not an expression: {getattr(exc, 'msg', exc)}") from None
        names: set[str] = set()
        if not _check(tree, text, whole, names, 0):
            raise CostError(f"{text!r} may give a fraction; round it with ceil() or floor()")
        return cls(text, tree, frozenset(names))

    def evaluate(self, params: Mapping[str, object]) -> int:
        """The cost for these (already validated) parameters: an int in [0, MAX_COST], else CostError."""
        try:
            value = _eval(self._tree, params)
        except ZeroDivisionError:
            raise CostError(f"the cost rule {self.text!r} divides by zero for these parameters") from None
        if value.denominator != 1:  # pragma: no cover - excluded by the whole-number check at load
            raise CostError(f"the cost rule {self.text!r} gave a fraction ({value})")
        cost = int(value)
        if not 0 <= cost <= MAX_COST:
            shown = cost if abs(cost) < 10**20 else ("a huge negative number" if cost < 0 else "more than 2^53")
            raise CostError(
                f"the cost rule {self.text!r} gives {shown} for these parameters; a cost must be from 0 to {MAX_COST}"
            )
        return cost


def _check(node: ast.expr, text: str, whole: Mapping[str, bool], names: set[str], depth: int) -> bool:
    """Refuse anything outside the language (CostError); return whether ``node`` is whole-valued."""
    if depth > MAX_RULE_DEPTH:
        raise CostError(f"{text!r} is nested deeper than {MAX_RULE_DEPTH}")
    piece = ast.get_source_segment(text, node) or type(node).__name__
    match node:
        case ast.Constant(value=value) if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CostError(f"{piece!r} is not a number")
        case ast.Constant(value=int()):
            return True
        case ast.Constant(value=float(value)):
            if not math.isfinite(value):
                raise CostError(f"{piece!r} is not a finite number")
            return Fraction(repr(value)).denominator == 1
        case ast.Name(id=name):
            if name not in whole:
                known = ", ".join(sorted(whole)) or "none"
                raise CostError(f"{name!r} is not a numeric parameter of this template (numeric ones: {known})")
            names.add(name)
            return whole[name]
        case ast.UnaryOp(op=ast.USub() | ast.UAdd(), operand=operand):
            return _check(operand, text, whole, names, depth + 1)
        case ast.BinOp(left=left, op=ast.Add() | ast.Sub() | ast.Mult() | ast.Div() as op, right=right):
            lw = _check(left, text, whole, names, depth + 1)
            rw = _check(right, text, whole, names, depth + 1)
            return lw and rw and not isinstance(op, ast.Div)
        case ast.Call(func=ast.Name(id=fn), args=args, keywords=[]) if fn in FUNCTIONS:
            low, high = FUNCTIONS[fn]
            if len(args) < low or (high is not None and len(args) > high):
                wanted = f"{low}" if low == high else f"at least {low}"
                raise CostError(f"{piece!r}: {fn}() takes {wanted} argument{'s' if low != 1 else ''}")
            if any(isinstance(a, ast.Starred) for a in args):
                raise CostError(f"{piece!r}: no * arguments")
            each = [_check(a, text, whole, names, depth + 1) for a in args]
            return fn in _WHOLE or all(each)
        case ast.Call():
            raise CostError(f"{piece!r}: only ceil, floor, min and max may be called")
        case _:
            raise CostError(
                f"{piece!r} is not allowed (numbers, parameter names, + - * /, ceil, floor, min, max "
                "and parentheses are)"
            )


def _number(value: object) -> Number:
    if isinstance(value, bool):
        return Fraction(int(value))
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):  # the decimal the user wrote, not its binary approximation
        return Fraction(repr(value))
    raise CostError(f"{value!r} is not a number")  # pragma: no cover - parameters are validated first


_BINARY: Mapping[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_CALLS: Mapping[str, Callable[[list[Number]], Number]] = {
    "ceil": lambda a: Fraction(math.ceil(a[0])),
    "floor": lambda a: Fraction(math.floor(a[0])),
    "min": min,
    "max": max,
}


def _eval(node: ast.expr, params: Mapping[str, object]) -> Number:
    """Walk a tree ``_check`` accepted (so every other node type is unreachable)."""
    match node:
        case ast.Constant(value=value):
            return _number(value)
        case ast.Name(id=name):
            return _number(params[name])
        case ast.UnaryOp(op=op, operand=operand):
            v = _eval(operand, params)
            return -v if isinstance(op, ast.USub) else v
        case ast.BinOp(left=left, op=op, right=right):
            return _BINARY[type(op)](_eval(left, params), _eval(right, params))
        case ast.Call(func=ast.Name(id=fn), args=args):
            return _CALLS[fn]([_eval(a, params) for a in args])
    raise CostError(f"unexpected {type(node).__name__}")  # pragma: no cover
