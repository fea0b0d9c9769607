"""The comfy actor: one per ComfyUI backend. WebSocket events in (under a supervisor), HTTP commands out.

Two halves share one nursery and nothing but the report channel:

* the **connection** (``_connection.py``) keeps exactly one WebSocket open to
  ``ws://host:port/ws?clientId=<client_id>``, restarts it with backoff, and reports BackendUp / BackendLost /
  BackendEvents (the events of one socket read);
* the **command loop** (here) reads the inbox and starts one task per command (``_commands.py``), so it never
  waits on HTTP or on the report channel: the registry -> comfy -> registry cycle cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

from ._commands import Commands
from ._config import BackendSpec, ComfyCounters, ComfyTimeouts
from ._connection import Connection, Dial
from ._http11 import Http11Client
from ._messages import ComfyCommand, ComfyReport
from ._supervisor import RestartPolicy, full_jitter

__all__ = ["run"]

log = logging.getLogger(__name__)


async def run(
    spec: BackendSpec,
    inbox: trio.MemoryReceiveChannel[ComfyCommand],
    reports: trio.MemorySendChannel[ComfyReport],
    *,
    http: httpx.AsyncClient,
    client_id: str,
    policy: RestartPolicy = RestartPolicy(),
    timeouts: ComfyTimeouts = ComfyTimeouts(),
    jitter: Callable[[float], float] = full_jitter,
    counters: ComfyCounters | None = None,
    on_dispatch: Callable[[str], Awaitable[None]] | None = None,
    lean_submit: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the actor for one backend until ``inbox`` is closed; then close the socket and return.

    ``reports`` is owned by the actor and closed when it returns: give each actor its own ``clone()``. ``http`` is
    shared and not closed here. ``counters``, if given, is kept up to date by the actor: read it with
    ``counters.statistics()``. Started means "running", not "connected": ``BackendUp`` tells when the socket is up.
    Commands in flight when the inbox closes are cancelled. ``on_dispatch(task_id)``, if given, is awaited before each
    submit is sent (the gateway records the task as in flight in this run, for the crash quarantine). With
    ``lean_submit`` (the gateway's choice), ``POST /prompt`` goes over the actor's own keep-alive connections
    (``_http11.Http11Client``) when the URL allows it (plain http, no proxy); all other requests use ``http``.
    """
    if counters is None:
        counters = ComfyCounters()
    base = spec.url.rstrip("/")
    dial = Dial.from_url(spec.url, client_id)
    connection = Connection(spec.name, base, dial, reports, http, timeouts, counters)
    poster = Http11Client(base) if lean_submit and Http11Client.usable(base) else None
    commands = Commands(
        spec.name,
        base,
        reports,
        http,
        client_id,
        timeouts.http,
        on_accepted=connection.note_submitted,
        on_dispatch=on_dispatch,
        poster=poster,
    )
    try:
        with reports, inbox:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.keep_connected, policy, jitter)
                task_status.started()
                async for command in inbox:
                    nursery.start_soon(commands.handle, command)
                log.info("%s: inbox closed, stopping", spec.name)
                nursery.cancel_scope.cancel()
    finally:
        if poster is not None:
            poster.close()
