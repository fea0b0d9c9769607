"""The door: one pure validator, shared by HTTP and STOMP, for JSON bodies and ComfyUI workflows.

A workflow is accepted only if it can be forwarded to ComfyUI byte for byte: the body is valid UTF-8 JSON with
no ``NaN``/``Infinity`` (httpx refuses to encode them), no string or key anywhere holds a lone surrogate (the
JSON escape ``\\ud800`` decodes to one, and encoding it as UTF-8 for ComfyUI raises ``UnicodeEncodeError``), and
its nesting depth, value count, node count, key and string lengths are within ``WorkflowLimits``. Every check
says what is wrong and where (``Problem.detail``), so a refusal is a 400 / ``rejected`` that names the problem.

No trio, no I/O: ``decode_json`` never raises (``RecursionError``, ``UnicodeDecodeError``, ``ValueError`` all
become a ``Problem``) and the walks are iterative (an explicit stack), so no input can recurse deeply here.

    decode_json(data, limits) -> (value, None) | (None, Problem)
    check_json(value, limits, where="body") -> Problem | None
    validate_workflow(obj, limits) -> Problem | None
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Problem", "WorkflowLimits", "check_json", "decode_json", "lone_surrogate", "validate_workflow"]


@dataclass(frozen=True, slots=True)
class WorkflowLimits:
    """Each has a default and a ``serve`` flag (README flag table)."""

    max_depth: int = 32  # nesting of objects/arrays, the body's own braces included
    max_items: int = 100_000  # JSON values in one body (every object, array, string, number...)
    max_nodes: int = 1_000  # nodes in one workflow (its top-level keys)
    max_key_length: int = 256  # characters of one object key
    max_string_length: int = 256 * 1024  # characters of one string value

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_items", "max_nodes", "max_key_length", "max_string_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a body or workflow is refused: a machine code (``bad_json`` | ``bad_workflow``) and a readable detail."""

    code: str
    detail: str


def lone_surrogate(s: str) -> int | None:
    """The index of the first lone surrogate in ``s`` (a str that cannot be encoded as UTF-8), or None."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(data: bytes | str, limits: WorkflowLimits) -> tuple[Any, Problem | None]:
    """Parse a body: strict UTF-8, standard JSON only, then ``check_json``. Never raises."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, Problem("bad_json", f"the body is not valid UTF-8 (byte {exc.start}: {exc.reason})")
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # the C parser recurses per level: far too deep (check_json refuses > max_depth)
        return None, Problem("bad_json", f"the body is nested deeper than {limits.max_depth}")
    except json.JSONDecodeError as exc:
        return None, Problem("bad_json", f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except ValueError as exc:  # NaN/Infinity, an integer with too many digits
        return None, Problem("bad_json", f"the body is not acceptable JSON: {str(exc)[:200]}")
    problem = check_json(value, limits)
    return (None, problem) if problem is not None else (value, None)


def _path(parts: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in parts) or "(top level)"


def check_json(value: Any, limits: WorkflowLimits, where: str = "body") -> Problem | None:
    """Walk a decoded JSON value without recursion: depth, value count, key and string lengths, lone surrogates,
    non-finite floats. The first problem found is returned, with the path where it is.

    A cheap walk (``_fine``: no paths, leaves checked in place) says first whether there is any problem at all; only
    then does the walk below run, which finds the first one and names where it is."""
    if _fine(value, limits):
        return None
    return _first_problem(value, limits, where)


def _fine(value: Any, limits: WorkflowLimits) -> bool:
    """True if ``_first_problem`` would find nothing; False if it would, or if unsure (a type json.loads never
    makes). The problems are the same whatever order the values are visited in, so this walk may take its own."""
    max_items, max_depth = limits.max_items, limits.max_depth
    max_key, max_string = limits.max_key_length, limits.max_string_length
    items = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        items += 1
        t = type(v)
        children: Any
        if t is dict:
            for key in v:
                if type(key) is not str or len(key) > max_key or not (key.isascii() or lone_surrogate(key) is None):
                    return False
            children = v.values()
        elif t is list:
            children = v
        elif t is str:
            if len(v) > max_string or not (v.isascii() or lone_surrogate(v) is None):
                return False
            continue
        elif t is float:
            if not math.isfinite(v):
                return False
            continue
        elif t is int or t is bool or v is None:
            continue
        else:
            return False
        if depth > max_depth:
            return False
        for child in children:
            tc = type(child)
            if tc is str:
                if len(child) > max_string or not (child.isascii() or lone_surrogate(child) is None):
                    return False
            elif tc is int or tc is bool or child is None:
                pass
            elif tc is float:
                if not math.isfinite(child):
                    return False
            else:
                stack.append((child, depth + 1))
                continue
            items += 1
        if items > max_items:
            return False
    return items <= max_items


def _first_problem(value: Any, limits: WorkflowLimits, where: str) -> Problem | None:
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    items = 0
    while stack:
        v, depth, path = stack.pop()
        items += 1
        if items > limits.max_items:
            return Problem("bad_json", f"the {where} has more than {limits.max_items} JSON values")
        if isinstance(v, str):
            if len(v) > limits.max_string_length:
                return Problem(
                    "bad_json", f"string at {where}{_path(path)} is longer than {limits.max_string_length} characters"
                )
            at = lone_surrogate(v)
            if at is not None:
                return Problem(
                    "bad_json",
                    f"string at {where}{_path(path)} holds a lone surrogate "
                    f"U+{ord(v[at]):04X} at index {at}: it cannot be encoded as UTF-8",
                )
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                return Problem("bad_json", f"number at {where}{_path(path)} is not finite")
        elif isinstance(v, (dict, list)):
            if depth > limits.max_depth:
                return Problem("bad_json", f"the {where} is nested deeper than {limits.max_depth} at {_path(path)}")
            if isinstance(v, dict):
                for key, child in v.items():
                    if not isinstance(key, str):
                        return Problem("bad_json", f"key {key!r} at {where}{_path(path)} is not a string")
                    if len(key) > limits.max_key_length:
                        return Problem(
                            "bad_json",
                            f"a key at {where}{_path(path)} is longer than {limits.max_key_length} characters",
                        )
                    at = lone_surrogate(key)
                    if at is not None:
                        return Problem(
                            "bad_json",
                            f"a key at {where}{_path(path)} holds a lone surrogate U+{ord(key[at]):04X} at index {at}",
                        )
                    stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(v))
        elif not (v is None or isinstance(v, (bool, int))):
            return Problem("bad_json", f"value at {where}{_path(path)} is a {type(v).__name__}, not JSON")
    return None


def validate_workflow(obj: object, limits: WorkflowLimits | None = None) -> Problem | None:
    """A ``Problem`` saying why ``obj`` is not an API-format ComfyUI prompt that can be forwarded, or None."""
    limits = limits or WorkflowLimits()
    if not isinstance(obj, dict) or not obj:
        return Problem("bad_workflow", "workflow must be a non-empty JSON object of nodes (ComfyUI API format)")
    if len(obj) > limits.max_nodes:
        return Problem("bad_workflow", f"workflow has {len(obj)} nodes (limit {limits.max_nodes})")
    problem = check_json(obj, limits, "workflow")
    if problem is not None:
        return Problem("bad_workflow", problem.detail)
    for node_id, node in obj.items():
        if not isinstance(node, dict):
            return Problem("bad_workflow", f"node {node_id!r} must be an object")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            return Problem("bad_workflow", f"node {node_id!r} has no class_type")
        if not isinstance(node.get("inputs", {}), dict):
            return Problem("bad_workflow", f"node {node_id!r}: inputs must be an object")
    return None
