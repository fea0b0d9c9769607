"""Templates as data: one JSON file per template in a directory, checked when loaded, resolved per task.

A file holds ``{"name"?, "title"?, "description"?, "workflow": {ComfyUI API-format graph}, "params": {NAME:
{...}}, "cost": "rule"}`` (``name`` defaults to the file's stem; parameter order is the form's order). Loading
checks everything a task will rely on, so a task built from a loaded template cannot fail for the template's sake:
the graph is well formed (every node has a class_type, every link points at a node), every binding path exists
and is a value, every default passes its own checks, the cost rule is in the language and whole-valued. A bad file
is refused with its name and the field at fault, and the other files still load.

``Template.resolve(params, rng)`` checks submitted parameters (all problems at once, each naming its parameter),
fills defaults, draws a missing seed, prices the task and writes the values into a copy of the graph.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cost import CostError, CostRule
from ._params import Param, ParamSpecError

__all__ = [
    "BUNDLED_DIR",
    "Catalog",
    "LoadError",
    "ParamError",
    "Resolved",
    "Template",
    "TemplateError",
    "check_graph",
    "load_directory",
    "load_file",
]

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"  # shipped as package data
MAX_FILE_BYTES = 1 << 20  # bytes of one template file
TEMPLATE_FIELDS = frozenset({"name", "title", "description", "workflow", "params", "cost"})
MAX_PROBLEMS_SHOWN = 10  # parameter problems named in one refusal (the rest are counted)
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TemplateError(ValueError):
    """A template file that cannot be loaded: ``file`` (its name), ``field`` (a dotted path, "" for the file)."""

    def __init__(self, file: str, field: str, message: str) -> None:
        super().__init__(f"{file}: {field + ': ' if field else ''}{message}")
        self.file, self.field, self.reason = file, field, message


class ParamError(ValueError):
    """Submitted parameters refused: ``problems`` is [(parameter name, reason)], every one found."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        shown = "; ".join(f"{name}: {reason}" for name, reason in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        super().__init__(shown + (f"; and {more} more" if more > 0 else ""))
        self.problems = problems

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.problems]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A task built from a template: the graph to run, its price, and the parameters it was built with."""

    template: str
    workflow: dict[str, Any]
    params: dict[str, Any]  # every parameter, in the template's order, with defaults and the drawn seed
    cost: int


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    title: str
    description: str
    workflow: Mapping[str, Any]
    params: Mapping[str, Param]  # in the file's order
    cost: CostRule
    file: str

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "params": {name: p.schema() for name, p in self.params.items()},
            "cost": self.cost.text,
        }

    def node_classes(self) -> set[str]:
        return {node["class_type"] for node in self.workflow.values()}

    def resolve(self, submitted: object, rng: random.Random) -> Resolved:
        """Check ``submitted`` (a JSON object; null or absent values take their default), or raise ParamError."""
        if submitted is None:
            submitted = {}
        if not isinstance(submitted, dict):
            raise ParamError([("params", "must be a JSON object of parameter values")])
        problems: list[tuple[str, str]] = []
        for name in submitted:
            if name not in self.params:
                takes = ", ".join(self.params) or "none"
                problems.append((str(name)[:64], f"unknown parameter (template {self.name} takes {takes})"))
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            value = param.canonical(submitted.get(name))
            if value is not None:
                reason = param.problem(value)
                if reason is not None:
                    problems.append((name, reason))
                values[name] = value
            elif param.random:
                values[name] = rng.randint(int(param.low), int(param.high))
            elif param.required:
                problems.append((name, "is required"))
            else:
                values[name] = param.default
        if problems:
            raise ParamError(problems)
        try:
            cost = self.cost.evaluate(values)
        except CostError as exc:
            raise ParamError([("cost", str(exc))]) from None
        workflow = copy.deepcopy(dict(self.workflow))
        for name, param in self.params.items():
            for b in param.bind:
                workflow[b.node]["inputs"][b.input] = values[name]
        return Resolved(self.name, workflow, values, cost)


@dataclass(frozen=True, slots=True)
class LoadError:
    file: str
    field: str
    error: str  # the whole message, naming the file and the field

    def as_json(self) -> dict[str, str]:
        return {"file": self.file, "field": self.field, "error": self.error}


@dataclass(frozen=True, slots=True)
class Catalog:
    """The templates of one directory as loaded at one moment (immutable: a reload makes a new one)."""

    directory: str = ""
    templates: Mapping[str, Template] = field(default_factory=dict)  # by name, in file order
    errors: tuple[LoadError, ...] = ()

    def get(self, name: object) -> Template | None:
        return self.templates.get(name) if isinstance(name, str) else None

    def schema(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.templates.values()]


def load_directory(directory: str | Path) -> Catalog:
    """Every ``*.json`` file of ``directory`` (sorted by name). Bad files become ``errors``; OSError if the
    directory itself cannot be listed."""
    root = Path(directory)
    files = sorted(p for p in root.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    templates: dict[str, Template] = {}
    errors: list[LoadError] = []
    for path in files:
        try:
            t = load_file(path)
            if t.name in templates:
                raise TemplateError(path.name, "name", f"{t.name!r} is already the name of {templates[t.name].file}")
        except TemplateError as exc:
            log.error("templates: refused %s", exc)
            errors.append(LoadError(exc.file, exc.field, str(exc)))
            continue
        templates[t.name] = t
    log.info(
        "templates: %d loaded from %s (%s)%s",
        len(templates),
        root,
        ", ".join(templates) or "none",
        f", {len(errors)} refused" if errors else "",
    )
    return Catalog(str(root), templates, tuple(errors))


def load_file(path: Path) -> Template:
    """One template file, checked; TemplateError naming the file and the field otherwise."""
    file = path.name
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TemplateError(file, "", f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TemplateError(file, "", f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TemplateError(file, "", f"is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise TemplateError(file, "", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise TemplateError(file, "", "is nested too deeply") from None
    if not isinstance(raw, dict):
        raise TemplateError(file, "", "must hold a JSON object")
    for key in raw:
        if key not in TEMPLATE_FIELDS:
            raise TemplateError(file, key, f"unknown field (known: {', '.join(sorted(TEMPLATE_FIELDS))})")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not TEMPLATE_NAME.fullmatch(name):
        raise TemplateError(
            file, "name", "must be 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    for key in ("title", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise TemplateError(file, key, "must be a string")
    workflow = raw.get("workflow")
    problem = check_graph(workflow)
    if problem is not None:
        raise TemplateError(file, f"workflow{problem[0]}", problem[1])
    assert isinstance(workflow, dict)
    params_raw = raw.get("params", {})
    if not isinstance(params_raw, dict):
        raise TemplateError(file, "params", "must be an object of NAME: {type, bind, ...}")
    params: dict[str, Param] = {}
    bound: dict[tuple[str, str], str] = {}
    for pname, spec in params_raw.items():
        try:
            param = Param.parse(pname, spec, workflow)
        except ParamSpecError as exc:
            raise TemplateError(file, f"params.{pname}" + (f".{exc.field}" if exc.field else ""), str(exc)) from None
        for b in param.bind:
            if (b.node, b.input) in bound:
                raise TemplateError(
                    file, f"params.{pname}.bind", f"{b.path!r} is already bound by {bound[(b.node, b.input)]!r}"
                )
            bound[(b.node, b.input)] = pname
        params[pname] = param
    if "cost" not in raw:
        raise TemplateError(file, "cost", 'is missing: every template needs a cost rule (e.g. "1")')
    whole = {n: w for n, p in params.items() if (w := p.whole) is not None}
    try:
        rule = CostRule.parse(raw["cost"], whole)
    except CostError as exc:
        raise TemplateError(file, "cost", str(exc)) from None
    sample = {n: _sample(params[n]) for n in rule.names}
    if None not in sample.values():
        try:
            rule.evaluate(sample)  # refuses e.g. "1 / 0", or a negative price at the defaults
        except CostError as exc:
            raise TemplateError(file, "cost", f"{exc} (checked with {sample})") from None
    return Template(
        name=name,
        title=raw.get("title") or name,
        description=raw.get("description", ""),
        workflow=copy.deepcopy(workflow),
        params=params,
        cost=rule,
        file=file,
    )


def _sample(p: Param) -> Any:
    """A value the parameter surely accepts (its default, else its lowest), or None if there is no obvious one."""
    if p.has_default:
        return p.default
    if p.type == "enum":
        return p.values[0]
    if p.type == "boolean":
        return False
    return p.min if p.min is not None else 0 if p.random else None


def check_graph(workflow: object) -> tuple[str, str] | None:
    """(field suffix, reason) if ``workflow`` is not a well-formed API-format graph whose text can be sent to
    ComfyUI as it is; None if it is."""
    if not isinstance(workflow, dict) or not workflow:
        return "", "must be a non-empty object of nodes (ComfyUI API format)"
    try:
        json.dumps(workflow, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "", "contains a lone surrogate (not valid Unicode text)"
    for node_id, node in workflow.items():
        if not isinstance(node, dict):
            return f".{node_id}", "must be an object"
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            return f".{node_id}.class_type", "is missing"
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            return f".{node_id}.inputs", "must be an object"
        for input_name, value in inputs.items():
            link = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            if link and value[0] not in workflow:
                return f".{node_id}.inputs.{input_name}", f"links to node {value[0]!r}, which is not in the workflow"
    return None
