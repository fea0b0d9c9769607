"""Reading a Redis stream from a bridge: one blocking ``XREAD`` at a time, retried while Redis is away."""

from __future__ import annotations

import logging
from typing import Any

import trio
from coredis.exceptions import RedisError

from ..store import RedisStore

log = logging.getLogger(__name__)

BATCH = 256  # entries per read
BLOCK_MS = 1000  # how long one read waits for new entries
RETRY_DELAY = 0.5  # seconds between attempts while Redis is unreachable


async def read_after(store: RedisStore, key: str, last: str) -> tuple[Any, ...]:
    """The entries of stream ``key`` after id ``last`` (waiting up to BLOCK_MS for some; () if none came).
    Connection failures are logged and retried, so the caller's loop goes on when Redis is back."""
    while True:
        try:
            got = await store.client.xread({key: last}, count=BATCH, block=BLOCK_MS)
            return tuple((got or {}).get(key, ()))
        except (RedisError, OSError) as exc:
            log.warning("bridge: reading %s failed, retrying: %s", key, exc)
            await trio.sleep(RETRY_DELAY)
