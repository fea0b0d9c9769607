"""The HTTP half of a comfy actor: SubmitPrompt, CancelPrompt, CheckPrompts -> ComfyUI's /prompt, /queue, /history.

Each command runs in its own task (see ``_actor.run``). At most ``COMMAND_CONCURRENCY`` requests are in flight;
a task sends its reports after giving its HTTP slot back, so a slow registry never holds a slot. Nothing here adds
an ``Origin`` header (ComfyUI answers 403 to a foreign one, docs/comfyui-protocol.md section 2.1). ``POST /prompt``
goes through ``poster`` when one is given (``_http11.Http11Client``, the lean client), everything else through httpx.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Final

import httpx
import trio

from ._http11 import Http11Client, Response
from ._messages import (
    CancelPrompt,
    CheckPrompts,
    ComfyCommand,
    ComfyReport,
    PromptAccepted,
    PromptFailed,
    PromptLocated,
    PromptRejected,
    PromptSubmitUnknown,
    SubmitPrompt,
)
from ._protocol import format_rejection

log = logging.getLogger(__name__)

COMMAND_CONCURRENCY: Final = 8  # HTTP requests in flight per backend
GATEWAY_ERRORS: Final = frozenset({502, 503, 504})  # a proxy answered: the prompt may or may not have been queued


class HTTPFailed(Exception):
    """A request to ComfyUI got no answer (transport error or our own deadline)."""


async def request(
    http: httpx.AsyncClient | Http11Client, base: str, method: str, path: str, *, timeout: float, json_body: Any = None
) -> httpx.Response | Response:
    """One HTTP request under a whole-request deadline (trio's, so MockClock governs it too).

    httpx's own timeouts are per phase (connect, read, ...); ``timeout`` bounds the whole exchange, body included.
    An ``Http11Client`` is bound to its ComfyUI (``base`` is its own); it raises httpx's exceptions.
    """
    try:
        with trio.fail_after(timeout):
            if isinstance(http, Http11Client):
                return await http.request(method, path, json_body=json_body)
            return await http.request(method, base + path, json=json_body)
    except trio.TooSlowError:
        raise HTTPFailed(f"{method} {path}: no answer within {timeout}s") from None
    except httpx.HTTPError as exc:
        raise HTTPFailed(f"{method} {path}: {type(exc).__name__}: {exc}") from exc


class Commands:
    def __init__(
        self,
        name: str,
        base: str,
        reports: trio.MemorySendChannel[ComfyReport],
        http: httpx.AsyncClient,
        client_id: str,
        timeout: float,
        on_accepted: Callable[[float], None] | None = None,
        on_dispatch: Callable[[str], Awaitable[None]] | None = None,
        poster: Http11Client | None = None,
    ) -> None:
        """``on_accepted(sent_at)`` is told the trio time each accepted submit was sent (the connection then expects
        ComfyUI's ``status`` broadcast on its socket). ``poster``, if given, sends ``POST /prompt`` instead of httpx."""
        self.name = name
        self.base = base
        self.reports = reports
        self.http = http
        self.client_id = client_id
        self.timeout = timeout
        self.on_accepted = on_accepted
        self.on_dispatch = on_dispatch
        self.poster = poster
        self.limiter = trio.CapacityLimiter(COMMAND_CONCURRENCY)

    async def handle(self, command: ComfyCommand) -> None:
        """Run one command. An exception fails only this command (crash isolation): a submit becomes a
        ``PromptFailed`` report (the registry fails the task as ``internal`` and refunds it); the actor goes on."""
        report: ComfyReport | None = None
        try:
            match command:
                case SubmitPrompt():
                    if self.on_dispatch is not None:
                        await self.on_dispatch(command.task_id)
                    report = await self._submit(command)
                case CancelPrompt(prompt_id):
                    await self._cancel(prompt_id)
                case CheckPrompts(prompt_ids):
                    await self._check(prompt_ids)
                case _:  # only if a caller ignored the inbox's type
                    log.warning("%s: ignored unknown command %r", self.name, command)  # type: ignore[unreachable]
        except Exception as exc:  # trio.Cancelled is a BaseException: it passes
            log.exception(
                "%s: %s failed (task %s)", self.name, type(command).__name__, getattr(command, "task_id", "-")
            )
            if isinstance(command, SubmitPrompt):
                report = PromptFailed(self.name, command.task_id, command.prompt_id, f"{type(exc).__name__}: {exc}")
        if report is not None:
            await self.reports.send(report)

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> httpx.Response | Response:
        async with self.limiter:
            return await request(self.http, self.base, method, path, timeout=self.timeout, json_body=json_body)

    async def _submit(self, cmd: SubmitPrompt) -> ComfyReport:
        body = {"prompt": cmd.workflow, "client_id": self.client_id, "prompt_id": cmd.prompt_id}
        try:
            async with self.limiter:
                sent_at = trio.current_time()  # frames read from now on prove the socket hears this prompt
                response = await request(
                    self.poster or self.http, self.base, "POST", "/prompt", timeout=self.timeout, json_body=body
                )
        except HTTPFailed as exc:
            log.warning("%s: submit of %s: %s", self.name, cmd.prompt_id, exc)
            return PromptSubmitUnknown(self.name, cmd.task_id, cmd.prompt_id, str(exc))
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:  # not JSON (ComfyUI's 500 is text/plain)
            answer = None
        if 200 <= status < 300:
            number = answer.get("number") if isinstance(answer, dict) else None
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                # Accepted, but we cannot tell for sure: let the registry reconcile (it will find it in /queue).
                return PromptSubmitUnknown(self.name, cmd.task_id, cmd.prompt_id, f"HTTP {status}, unreadable body")
            prompt_id = answer.get("prompt_id")
            if prompt_id != cmd.prompt_id:  # ComfyUI honours our prompt_id since 2024; an older one picks its own
                log.warning("%s: ComfyUI queued %s as %r", self.name, cmd.prompt_id, prompt_id)
                prompt_id = prompt_id if isinstance(prompt_id, str) and prompt_id else cmd.prompt_id
            node_errors = answer.get("node_errors")
            if self.on_accepted is not None:
                self.on_accepted(sent_at)
            return PromptAccepted(
                self.name, cmd.task_id, prompt_id, number, node_errors if isinstance(node_errors, dict) else {}
            )
        if status in GATEWAY_ERRORS:
            return PromptSubmitUnknown(self.name, cmd.task_id, cmd.prompt_id, f"HTTP {status} from a proxy")
        detail = format_rejection(status, answer if answer is not None else response.text)
        log.info("%s: prompt %s rejected (HTTP %d): %s", self.name, cmd.prompt_id, status, detail)
        return PromptRejected(
            self.name, cmd.task_id, cmd.prompt_id, status, detail, answer if isinstance(answer, dict) else None
        )

    async def _cancel(self, prompt_id: str) -> None:
        # Delete first (still pending: it never starts), then interrupt (running: it stops at the next node or
        # progress update). The interrupt names the prompt, so another user's running prompt is never hit.
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                response = await self._request("POST", path, json_body=body)
            except HTTPFailed as exc:
                log.warning("%s: cancel of %s: %s", self.name, prompt_id, exc)
                continue
            if response.status_code != 200:
                log.warning("%s: cancel of %s: POST %s -> HTTP %d", self.name, prompt_id, path, response.status_code)

    async def _get_json(self, path: str) -> Any:
        """GET and parse; None if it failed in any way (logged)."""
        try:
            response = await self._request("GET", path)
        except HTTPFailed as exc:
            log.warning("%s: %s", self.name, exc)
            return None
        if response.status_code != 200:
            log.warning("%s: GET %s -> HTTP %d", self.name, path, response.status_code)
            return None
        try:
            return response.json()
        except ValueError:
            log.warning("%s: GET %s: body is not JSON", self.name, path)
            return None

    async def _check(self, prompt_ids: tuple[str, ...]) -> None:
        # /queue before /history: ComfyUI writes the history entry and drops the prompt from the running list in one
        # step, so in this order a prompt cannot slip between the two answers.
        queue = await self._get_json("/queue")
        queue_known = isinstance(queue, dict)
        running, pending = _queue_ids(queue, "queue_running"), _queue_ids(queue, "queue_pending")
        for prompt_id in prompt_ids:
            if prompt_id in running:
                located = PromptLocated(self.name, prompt_id, "running")
            elif prompt_id in pending:
                located = PromptLocated(self.name, prompt_id, "pending")
            else:
                history = await self._get_json("/history/" + urllib.parse.quote(prompt_id, safe=""))
                entry = history.get(prompt_id) if isinstance(history, dict) else None
                if isinstance(entry, dict):
                    located = PromptLocated(self.name, prompt_id, "done", entry)
                elif isinstance(history, dict) and queue_known:
                    located = PromptLocated(self.name, prompt_id, "missing")
                else:  # without /queue, "no history" could still mean pending
                    located = PromptLocated(self.name, prompt_id, "unknown")
            await self.reports.send(located)


def _queue_ids(queue: Any, key: str) -> frozenset[str]:
    """prompt_ids in GET /queue's running or pending list (items are [number, prompt_id, prompt, extra, outputs])."""
    items = queue.get(key) if isinstance(queue, dict) else None
    if not isinstance(items, list):
        return frozenset()
    return frozenset(item[1] for item in items if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str))
