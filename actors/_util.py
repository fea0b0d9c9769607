"""Small helpers every actor uses: one-shot replies and request/response over memory channels.

An actor's inbox carries frozen messages. A request that needs an answer carries its own one-shot reply
channel (buffer 1), so the actor never blocks on a slow requester (docs/STYLE.md section 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import trio

__all__ = ["ActorGone", "Forwarder", "NoAnswer", "Request", "ask", "ask_within", "reply_once"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R_contra = TypeVar("R_contra", contravariant=True)


class Request(Protocol[R_contra]):
    """A message that carries its own reply channel, as a ``reply`` field: what ``ask`` sends.

    ``ask`` reads the answer's type from that field, so ``await ask(ch, lambda r: GetTask(task_id, r))`` is typed
    as whatever ``GetTask.reply`` carries. A field typed ``MemorySendChannel[X] | None`` (an optional reply) fits.
    """

    @property
    def reply(self) -> trio.MemorySendChannel[R_contra] | None: ...


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
    inbox: trio.MemorySendChannel[Any],
    build: Callable[[trio.MemorySendChannel[T]], Request[T]],
    *,
    name: str = "actor",
) -> T:
    """Send ``build(reply)`` to an actor and wait for its answer, typed by the message's ``reply`` field.

    ``build`` is the message class itself when the reply channel is its only field (``ask(ch, Audit)``), else a
    lambda (``ask(ch, lambda r: Freeze(user, task, amount, r))``). The caller owns the timeout. That the inbox
    accepts the message is checked by the actor (each inbox's type is a union of its message classes).
    """
    reply_send, reply_recv = trio.open_memory_channel[T](1)
    with reply_recv:
        try:
            await inbox.send(build(reply_send))
            return await reply_recv.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            raise ActorGone(name) from None


class NoAnswer(Exception):
    """``ask_within`` got no answer: the actor has stopped (``gone``) or did not answer in time."""

    def __init__(self, name: str, *, gone: bool) -> None:
        super().__init__(f"actor {name!r} {'is gone' if gone else 'did not answer in time'}")
        self.name = name
        self.gone = gone


async def ask_within(
    inbox: trio.MemorySendChannel[Any],
    build: Callable[[trio.MemorySendChannel[T]], Request[T]],
    seconds: float,
    *,
    name: str = "actor",
) -> T:
    """``ask`` with a time limit: the one way a caller outside the actors (an HTTP request, a STOMP frame, a
    scrape) waits for an answer. Both ways of getting none become ``NoAnswer``."""
    try:
        with trio.fail_after(seconds):
            return await ask(inbox, build, name=name)
    except trio.TooSlowError:
        raise NoAnswer(name, gone=False) from None
    except ActorGone:
        raise NoAnswer(name, gone=True) from None


class Forwarder:
    """Sends to an actor's inbox without a checkpoint per message: ``send_nowait``, an ``await`` only when the
    inbox is full, and a checkpoint every ``every`` messages (STACK-NOTES §3.1: with ``await ch.send()`` per message
    the receiver runs after each one, so nothing downstream ever batches). A burst thus reaches the receiver whole;
    a lone message is still picked up at the sender's next checkpoint, which an actor reaches as soon as its own
    inbox is empty."""

    __slots__ = ("_n", "channel", "every")

    def __init__(self, channel: trio.MemorySendChannel[Any], every: int = 512) -> None:
        self.channel = channel
        self.every = every
        self._n = 0

    async def send(self, msg: Any) -> None:
        try:
            self.channel.send_nowait(msg)
        except trio.WouldBlock:
            self._n = 0
            await self.channel.send(msg)
            return
        self._n += 1
        if self._n >= self.every:
            self._n = 0
            await trio.lowlevel.checkpoint()
