"""The web side of workflow templates: the loaded catalog (reloadable), and what a task body becomes.

A task body is either a template call ``{"template": NAME, "params": {...}}``, resolved here into a graph, its
price and its parameters, or a raw workflow ``{"workflow": {...}, "size": n}``, which ``--raw-workflows`` may
forbid to non-admins and ``--allowed-nodes`` restricts to listed node classes. Either way the answer is decided
before the registry is asked, so a refused body freezes nothing. Template graphs are trusted (the operator wrote
them) and are not held to ``--allowed-nodes``.

The catalog is immutable; ``TemplateLibrary.reload`` (SIGHUP, ``POST /api/admin/templates/reload``) builds a new
one off the trio thread and swaps the reference, so a request sees either the old set or the new one, whole.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from actors import registry
from actors.templates import BUNDLED_DIR, Catalog, ParamError, load_directory
from actors.validate import validate_workflow

from .config import WebConfig

__all__ = ["TaskRequest", "TemplateLibrary", "parse_allowed_nodes", "prepare_task", "raw_workflows_allowed"]

log = logging.getLogger(__name__)

MAX_ALLOWED_NODES_BYTES = 1 << 20  # bytes of an --allowed-nodes @FILE


class TemplateLibrary:
    """The templates users may run: ``current`` is the catalog loaded last. Only used from the trio thread."""

    def __init__(self, directory: str | Path = "", *, rng: random.Random | None = None) -> None:
        self.directory = Path(directory) if directory else BUNDLED_DIR
        self.rng = rng or random.SystemRandom()  # draws missing seeds
        self.current: Catalog = load_directory(self.directory)  # OSError: the directory itself is unreadable
        self._lock = trio.Lock()

    async def reload(self) -> Catalog:
        """Load the directory again and swap the catalog in; the old one stays if the directory is unreadable
        (OSError). Bad files are left out and listed in the new catalog's ``errors``."""
        async with self._lock:
            catalog = await trio.to_thread.run_sync(load_directory, self.directory)
            self.current = catalog
            return catalog


def raw_workflows_allowed(policy: str, admin: bool) -> bool:
    """May this user submit a raw workflow under ``--raw-workflows`` (all | admin | none)?"""
    return policy == "all" or (policy == "admin" and admin)


def parse_allowed_nodes(spec: str) -> frozenset[str] | None:
    """``--allowed-nodes``: comma-separated class names, or ``@FILE`` (names separated by commas or lines, ``#``
    starts a comment). "" means no restriction (None). ValueError for an unreadable file or an empty list."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            with path.open("rb") as f:
                text = f.read(MAX_ALLOWED_NODES_BYTES + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--allowed-nodes {spec}: cannot read it: {exc}") from None
        if len(text) > MAX_ALLOWED_NODES_BYTES:
            raise ValueError(f"--allowed-nodes {spec}: larger than {MAX_ALLOWED_NODES_BYTES} bytes")
        spec = ",".join(line.split("#", 1)[0] for line in text.splitlines())
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise ValueError("--allowed-nodes lists no node class (leave it out for no restriction)")
    return names


def unlisted_nodes(workflow: Mapping[str, Any], allowed: frozenset[str]) -> list[str]:
    """``"ID (Class)"`` for every node whose class is not in ``allowed``, in workflow order."""
    return [
        f"{node_id} ({node['class_type']})" for node_id, node in workflow.items() if node["class_type"] not in allowed
    ]


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """A task body the web layer accepted, ready for ``registry.Submit``."""

    workflow: Mapping[str, Any]
    size: int
    cost: int | None = None  # None: the registry prices it (size × price)
    template: str | None = None
    params: Mapping[str, Any] | None = None


def prepare_task(
    body: Mapping[str, Any], library: TemplateLibrary, cfg: WebConfig, *, admin: bool
) -> TaskRequest | registry.Refused:
    """Check a POST /api/tasks or SEND /app/tasks body and turn it into a TaskRequest, or say why not."""
    if body.get("template") is not None:  # "template": null is a raw workflow, as if it were left out
        return _from_template(body, library)
    if not raw_workflows_allowed(cfg.raw_workflows, admin):
        who = "anyone" if cfg.raw_workflows == "none" else "users"
        return registry.Refused(
            "raw_workflow_forbidden",
            f"this gateway does not run raw workflows for {who} (--raw-workflows "
            f"{cfg.raw_workflows}); submit a template: GET /api/templates lists them",
        )
    workflow = body.get("workflow")
    problem = validate_workflow(workflow, cfg.limits)  # the door: forwardable to ComfyUI byte for byte
    if problem is not None:
        return registry.Refused(problem.code, problem.detail)
    assert isinstance(workflow, dict)
    if cfg.allowed_nodes is not None:
        unlisted = unlisted_nodes(workflow, cfg.allowed_nodes)
        if unlisted:
            return registry.Refused(
                "node_not_allowed",
                f"node{'s' if len(unlisted) > 1 else ''} "
                f"{', '.join(unlisted[:10])}{' …' if len(unlisted) > 10 else ''} not in "
                f"--allowed-nodes on this gateway",
            )
    size = body.get("size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= cfg.max_task_size:
        return registry.Refused("bad_request", f"size must be an integer from 1 to {cfg.max_task_size}")
    return TaskRequest(workflow, size)


def _from_template(body: Mapping[str, Any], library: TemplateLibrary) -> TaskRequest | registry.Refused:
    for key in ("workflow", "size"):
        if key in body:
            return registry.Refused(
                "bad_request",
                f"{key!r} does not go with 'template': a template builds "
                "the workflow and prices the task from its parameters",
            )
    catalog = library.current
    name = body["template"]
    template = catalog.get(name)
    if template is None:
        shown = repr(name)[:80] if isinstance(name, str) else f"a {type(name).__name__}"
        return registry.Refused(
            "unknown_template",
            f"no template {shown}; this gateway has {', '.join(catalog.templates) or 'none'} (GET /api/templates)",
        )
    try:
        resolved = template.resolve(body.get("params"), library.rng)
    except ParamError as exc:
        return registry.Refused("bad_params", f"template {template.name}: {exc}")
    return TaskRequest(resolved.workflow, 1, resolved.cost, resolved.template, resolved.params)
