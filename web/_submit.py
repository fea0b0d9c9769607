"""Submitting a task, shared by POST /api/tasks (``web.app``) and SEND /app/tasks (``web._ws_commands``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actors import NoAnswer, ask_within, registry
from actors.gateway import Handles

from ._templates import TemplateLibrary, prepare_task
from .auth import Principal
from .config import WebConfig

ASK_TIMEOUT = 10.0  # seconds an HTTP request (or a SEND) waits for an actor


async def submit(
    handles: Handles,
    cfg: WebConfig,
    templates: TemplateLibrary,
    who: Principal,
    client_id: str,
    body: Mapping[str, Any],
) -> registry.Accepted | registry.Refused:
    """Validate a task body (shared by POST /api/tasks and SEND /app/tasks) and hand it to the registry: a template
    call is resolved into its graph, price and parameters; a raw workflow is held to --raw-workflows and
    --allowed-nodes. A refusal here freezes nothing."""
    req = prepare_task(body, templates, cfg, admin=who.admin)
    if isinstance(req, registry.Refused):
        return req
    try:
        return await ask_within(
            handles.registry,
            lambda r: registry.Submit(
                who.user_id,
                client_id,
                req.workflow,
                req.size,
                r,
                cost=req.cost,
                template=req.template,
                params=req.params,
            ),
            ASK_TIMEOUT,
            name="registry",
        )
    except NoAnswer:
        return registry.Refused("unavailable", "the gateway is busy; try again")


__all__ = ["ASK_TIMEOUT", "submit"]
