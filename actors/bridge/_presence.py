"""Which gateway processes share a Redis store: each one refreshes ``<prefix>proc:<id>`` (its role, URL, pid) every
``every`` seconds with an expiry of three periods, so a killed process drops out of ``comfy-gateway status``
on its own."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import trio
from coredis.exceptions import RedisError

from ..lease import LeaseState
from ..store import RedisStore

log = logging.getLogger(__name__)


async def announce(
    store: RedisStore, state: LeaseState, url: str, *, every: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    key = f"{store.prefix}proc:{state.holder_id}"
    since = time.time()
    task_status.started()
    while True:
        info = {"id": state.holder_id, "role": state.role, "url": url, "pid": os.getpid(),
                "host": socket.gethostname(), "since": since, "seen": time.time(), "terms": state.terms}
        try:
            await store.client.set(key, json.dumps(info), px=max(1, int(every * 3000)))
        except (RedisError, OSError) as exc:
            log.debug("presence: %s", exc)
        await trio.sleep(every)


async def processes(store: RedisStore) -> list[dict[str, Any]]:
    """The live processes (those that announced themselves within three periods), by id."""
    out = []
    async for key in store.client.scan_iter(match=f"{store.prefix}proc:*"):
        raw = await store.client.get(key)
        if raw is not None:
            out.append(json.loads(raw))
    return sorted(out, key=lambda p: p["id"])
