"""A template parameter: its schema as written in a template file, its check of a submitted value, its bindings.

A parameter file entry is ``{"type", "default"?, "min"?, "max"?, "maxLength"?, "values"?, "bind", "title"?,
"description"?}``. ``type`` is ``string``, ``integer``, ``number``, ``boolean`` or ``enum`` (with ``values``).
``bind`` lists the workflow inputs the value is written to, each ``"NODE_ID.inputs.INPUT_NAME"``. A parameter
without ``default`` is required, except ``seed`` (an integer that is drawn at random when left out, and may not
have a default). Values are checked strictly: a JSON ``"20"`` is not the integer 20, ``true`` is not 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MAX_LENGTH", "MAX_SAFE_INTEGER", "PARAM_TYPES", "SEED", "Binding", "Param", "ParamSpecError"]

PARAM_TYPES = ("string", "integer", "number", "boolean", "enum")
FIELDS = frozenset({"type", "default", "min", "max", "maxLength", "values", "bind", "title", "description"})
SEED = "seed"  # the one parameter drawn at random when left out
MAX_SAFE_INTEGER = 2**53 - 1  # bounds of integers and numbers: what every JSON client represents exactly
DEFAULT_MAX_LENGTH = 10_000  # characters of a string parameter whose template sets no maxLength
MAX_MAX_LENGTH = 1_000_000
MAX_ENUM_VALUES = 256
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # usable as a name in a cost rule
RESERVED = frozenset({"ceil", "floor", "min", "max"})
_MISSING: Any = object()


class ParamSpecError(ValueError):
    """A parameter's entry in a template file is wrong: ``field`` is where (e.g. ``max``), the message what."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Binding:
    node: str
    input: str

    @property
    def path(self) -> str:
        return f"{self.node}.inputs.{self.input}"


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # an int is never turned into a float here: math.isfinite(10**400) raises OverflowError
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: str
    bind: tuple[Binding, ...]
    default: Any = _MISSING
    min: int | float | None = None
    max: int | float | None = None
    max_length: int | None = None
    values: tuple[Any, ...] = ()
    title: str = ""
    description: str = ""

    @property
    def random(self) -> bool:
        """Drawn at random when left out (the ``seed``)."""
        return self.name == SEED

    @property
    def required(self) -> bool:
        return self.default is _MISSING and not self.random

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING

    @property
    def whole(self) -> bool | None:
        """For cost rules: True if every value is a whole number, False if it may be a fraction, None if it is not
        a number at all (strings, enums of strings)."""
        if self.type in ("integer", "boolean"):
            return True
        if self.type == "number":
            return False
        if self.type == "enum" and all(_is_number(v) or isinstance(v, bool) for v in self.values):
            return all(float(v).is_integer() for v in self.values)
        return None

    @property
    def low(self) -> int | float:
        return self.min if self.min is not None else -MAX_SAFE_INTEGER if self.name != SEED else 0

    @property
    def high(self) -> int | float:
        return self.max if self.max is not None else MAX_SAFE_INTEGER

    def canonical(self, value: object) -> object:
        """The value as the template spells it: an HTML form sends every choice as text, so an enum of numbers or
        booleans also takes a choice's JSON text ("2" for 2, "true" for true). Other values are kept as given."""
        if self.type == "enum" and isinstance(value, str):
            for v in self.values:
                if not isinstance(v, str) and _show(v) == value:
                    return v
        return value

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not acceptable for this parameter (a readable reason), or None."""
        if self.type == "string":
            if not isinstance(value, str):
                return f"must be a string, not {_kind(value)} {_show(value)}"
            limit = self.max_length or DEFAULT_MAX_LENGTH
            if len(value) > limit:
                return f"is {len(value)} characters long; at most {limit} are allowed"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "contains a lone surrogate (not valid Unicode text)"
            return None
        if self.type == "boolean":
            return None if isinstance(value, bool) else f"must be true or false, not {_kind(value)} {_show(value)}"
        if self.type == "enum":
            if any(type(v) is type(value) and v == value for v in self.values):
                return None
            return f"must be one of {', '.join(map(_show, self.values))}, not {_show(value)}"
        if self.type == "integer" and not _is_int(value):
            return f"must be an integer, not {_kind(value)} {_show(value)}"
        if self.type == "number" and not _is_number(value):
            return f"must be a finite number, not {_kind(value)} {_show(value)}"
        if value < self.low:  # type: ignore[operator]
            return f"{_show(value)} is below the minimum {self.low}"
        if value > self.high:  # type: ignore[operator]
            return f"{_show(value)} is above the maximum {self.high}"
        return None

    def schema(self) -> dict[str, Any]:
        """What GET /api/templates shows (every key present; null where it does not apply). Bindings stay private."""
        numeric = self.type in ("integer", "number")
        return {
            "type": self.type,
            "title": self.title or self.name,
            "description": self.description,
            "required": self.required,
            "random": self.random,
            "default": self.default if self.has_default else None,
            "min": (self.min if self.min is not None else self.low) if numeric else None,
            "max": (self.max if self.max is not None else self.high) if numeric else None,
            "maxLength": (self.max_length or DEFAULT_MAX_LENGTH) if self.type == "string" else None,
            "values": list(self.values) if self.type == "enum" else None,
        }

    @classmethod
    def parse(cls, name: str, raw: object, workflow: Mapping[str, Any]) -> Param:
        """Read one entry of a template's ``params`` against the template's workflow; ParamSpecError if wrong."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
            raise ParamSpecError(
                "",
                "a parameter name must be a letter or _ then letters, digits or _ (at most 64), "
                "and not ceil, floor, min or max",
            )
        if not isinstance(raw, dict):
            raise ParamSpecError("", f"must be an object, not {_kind(raw)}")
        for key in raw:
            if key not in FIELDS:
                raise ParamSpecError(key, f"unknown field (known: {', '.join(sorted(FIELDS))})")
        kind = raw.get("type")
        if kind == "image":
            raise ParamSpecError("type", "image parameters are not supported by this gateway")
        if kind not in PARAM_TYPES:
            raise ParamSpecError("type", f"must be one of {', '.join(PARAM_TYPES)}, not {_show(kind)}")
        if name == SEED and kind != "integer":
            raise ParamSpecError("type", "seed must be an integer (it is drawn at random when left out)")
        fields: dict[str, Any] = {"name": name, "type": kind, "bind": _bindings(raw.get("bind"), workflow)}
        for key in ("title", "description"):
            if key in raw:
                if not isinstance(raw[key], str):
                    raise ParamSpecError(key, "must be a string")
                fields[key] = raw[key]
        _only_for(raw, "maxLength", ("string",), kind)
        _only_for(raw, "values", ("enum",), kind)
        _only_for(raw, "min", ("integer", "number"), kind)
        _only_for(raw, "max", ("integer", "number"), kind)
        if "maxLength" in raw:
            n = raw["maxLength"]
            if not _is_int(n) or not 1 <= n <= MAX_MAX_LENGTH:
                raise ParamSpecError("maxLength", f"must be an integer from 1 to {MAX_MAX_LENGTH}")
            fields["max_length"] = n
        for key in ("min", "max"):
            if key in raw:
                bound = raw[key]
                ok = _is_int(bound) if kind == "integer" else _is_number(bound)
                if not ok or abs(bound) > MAX_SAFE_INTEGER:
                    raise ParamSpecError(
                        key,
                        f"must be {'an integer' if kind == 'integer' else 'a number'} within "
                        f"±{MAX_SAFE_INTEGER}, not {_show(bound)}",
                    )
                fields[key] = bound
        if "min" in fields and "max" in fields and fields["min"] > fields["max"]:
            raise ParamSpecError("min", f"{fields['min']} is above max {fields['max']}")
        if kind == "enum":
            fields["values"] = _enum_values(raw.get("values"))
        if name == SEED:
            if "default" in raw:
                raise ParamSpecError("default", "seed takes no default: a missing seed is drawn at random")
            if fields.get("min", 0) < 0:
                raise ParamSpecError("min", "a seed cannot be negative")
        param = cls(**fields)
        if "default" in raw:
            reason = param.problem(raw["default"])
            if reason is not None:
                raise ParamSpecError("default", reason)
            param = cls(**fields, default=raw["default"])
        return param


def _only_for(raw: Mapping[str, Any], key: str, kinds: tuple[str, ...], kind: str) -> None:
    if key in raw and kind not in kinds:
        raise ParamSpecError(key, f"applies only to {' and '.join(kinds)} parameters, not {kind}")


def _enum_values(values: object) -> tuple[Any, ...]:
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_ENUM_VALUES:
        raise ParamSpecError("values", f"an enum needs a list of 1 to {MAX_ENUM_VALUES} values")
    seen: list[Any] = []
    for v in values:
        if not (isinstance(v, (str, bool)) or _is_number(v)):
            raise ParamSpecError("values", f"{_show(v)}: values must be strings, numbers or booleans")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ParamSpecError("values", f"{_show(v)} contains a lone surrogate") from None
        if any(type(s) is type(v) and s == v for s in seen):
            raise ParamSpecError("values", f"{_show(v)} is listed twice")
        seen.append(v)
    return tuple(seen)


def _bindings(bind: object, workflow: Mapping[str, Any]) -> tuple[Binding, ...]:
    if isinstance(bind, str):
        bind = [bind]
    if not isinstance(bind, list) or not bind:
        raise ParamSpecError("bind", 'must list one or more "NODE_ID.inputs.INPUT_NAME" paths')
    out: list[Binding] = []
    for path in bind:
        if not isinstance(path, str):
            raise ParamSpecError("bind", f"{_show(path)} is not a path string")
        node, sep, input_name = path.partition(".inputs.")
        if not sep or not node or not input_name:
            raise ParamSpecError("bind", f"{path!r} is not of the form NODE_ID.inputs.INPUT_NAME")
        target = workflow.get(node)
        if not isinstance(target, dict):
            raise ParamSpecError("bind", f"{path!r}: the workflow has no node {node!r}")
        inputs = target.get("inputs")
        if not isinstance(inputs, dict) or input_name not in inputs:
            raise ParamSpecError(
                "bind", f"{path!r}: node {node!r} ({target.get('class_type')}) has no input {input_name!r}"
            )
        if isinstance(inputs[input_name], list):
            raise ParamSpecError("bind", f"{path!r} is a link to another node; a parameter can only replace a value")
        binding = Binding(node, input_name)
        if binding in out:
            raise ParamSpecError("bind", f"{path!r} is listed twice")
        out.append(binding)
    return tuple(out)
