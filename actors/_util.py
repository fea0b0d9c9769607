"""Small helpers every actor uses: one-shot replies and request/response over memory channels.

An actor's inbox carries frozen messages. A request that needs an answer carries its own one-shot reply
channel (buffer 1), so the actor never blocks on a slow requester (docs/STYLE.md section 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")


class ActorGone(Exception):
    """The actor behind a channel has stopped (its inbox or the reply channel was closed)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"actor {name!r} is gone")
        self.name = name


def reply_once(reply: trio.MemorySendChannel[T], value: T) -> None:
    """Send the one answer to a request and close the reply channel; a requester that left is fine."""
    with reply:
        try:
            reply.send_nowait(value)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("requester gone before reply %r", value)
        except trio.WouldBlock:  # pragma: no cover - reply channels have a buffer of 1 and one answer
            log.error("reply channel full: answered twice?")


async def ask(
    inbox: trio.MemorySendChannel[M],
    build: Callable[[trio.MemorySendChannel[T]], M],
    *,
    name: str = "actor",
) -> T:
    """Send ``build(reply)`` to an actor and wait for its answer. The caller owns the timeout."""
    reply_send, reply_recv = trio.open_memory_channel[T](1)
    with reply_recv:
        try:
            await inbox.send(build(reply_send))
            return await reply_recv.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            raise ActorGone(name) from None
