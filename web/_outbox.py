"""A connection's outbound queue (``Outbox``): bounded in bytes, coalescing, never blocking the producer.

Its producers are the sessions hub (``actors.sessions``, which sees it as a ``Sink``) and the connection itself
(control frames); its one consumer is the connection's writer (``web._ws``). Over budget, progress/previews/status
are coalesced (the latest per task wins) or dropped and counted; any other message that does not fit fails the
connection ("slow consumer"). It tells the connection's timers (``on_due``) when a deadline comes nearer.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors.sessions import DROPPABLE_TYPES, Outgoing

DEFAULT_OUTBOX_BYTES = 1 << 20  # 1 MiB of queued frames per connection
DEFAULT_OUTBOX_DELAY = 10.0  # seconds the oldest queued frame may wait before the client is "slow"

__all__ = ["DEFAULT_OUTBOX_BYTES", "DEFAULT_OUTBOX_DELAY", "Outbox", "SlowConsumer"]


class SlowConsumer(Exception):
    """The connection could not keep up: an undroppable message did not fit, or frames waited too long."""


class Outbox:
    """A connection's outbound queue: bounded in bytes, coalescing, never blocking the producer.

    Producers (the hub's sessions and broadcasts, the connection's control frames) call ``put_nowait``; the connection's writer calls ``get_batch``.
    An idle connection's outbox is small (issue 11: 10,000 idle connections): slotted, a plain list as the queue,
    the coalescing index made on first use, and the waiting writer parked as a bare task (no ``trio.Event``).
    """

    __slots__ = (
        "_by_key",
        "_bytes",
        "_items",
        "_since",
        "_waiter",
        "coalesced",
        "delivered",
        "dropped",
        "failed",
        "max_bytes",
        "max_delay",
        "on_due",
    )

    def __init__(self, *, max_bytes: int = DEFAULT_OUTBOX_BYTES, max_delay: float = DEFAULT_OUTBOX_DELAY) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self._items: list[list[Outgoing | None]] = []  # one-element lists; None = coalesced away
        self._by_key: dict[tuple[str, str], list[Outgoing | None]] | None = None  # made for the first droppable
        self._bytes = 0
        self._since: float | None = None  # when the oldest waiting item was queued
        self._waiter: trio.lowlevel.Task | None = None  # the writer, parked in get_batch
        self.on_due: Callable[[float], None] | None = None  # told when a deadline (overdue, failed) comes nearer
        self.failed: str | None = None
        self.delivered = 0
        self.dropped = 0
        self.coalesced = 0

    def __repr__(self) -> str:
        return f"<Outbox {len(self._items)} items, {self._bytes} bytes, dropped={self.dropped} failed={self.failed!r}>"

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def idle(self) -> bool:
        """Nothing waits and the writer is parked in ``get_batch``: it is not in the middle of a send."""
        return not self._items and self._waiter is not None and self.failed is None

    def put_nowait(self, out: Outgoing) -> None:
        """Queue ``out``. Only when the outbox is over budget are droppable messages coalesced (the older one of
        the same task and type leaves the queue, this one goes last, so seqs stay in order) or dropped."""
        if self.failed is not None:
            return
        size = len(out.body)
        key = out.coalesce_key
        if self._bytes + size > self.max_bytes:
            if out.type not in DROPPABLE_TYPES:
                self._evict_droppable(size)
                if self._bytes + size > self.max_bytes:
                    self.fail(f"slow consumer: more than {self.max_bytes} bytes waiting")
                    return
            slot = self._by_key.get(key) if key is not None and self._by_key is not None else None
            if slot is not None and slot[0] is not None:
                self._bytes -= len(slot[0].body)
                slot[0] = None  # latest wins: the older one is skipped by get_batch
                self.coalesced += 1
            if self._bytes + size > self.max_bytes:
                self.dropped += 1
                return
        slot = [out]
        self._items.append(slot)
        if key is not None:
            if self._by_key is None:
                self._by_key = {}
            self._by_key[key] = slot
        self._bytes += size
        if self._since is None:
            self._since = trio.current_time()
            if self.on_due is not None:
                self.on_due(self._since + self.max_delay)
        self._wake()

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _evict_droppable(self, size: int) -> None:
        """Make room for an undroppable message by dropping waiting progress/previews, oldest first."""
        for slot in self._items:
            if self._bytes + size <= self.max_bytes:
                return
            item = slot[0]
            if item is not None and item.type in DROPPABLE_TYPES:
                self._bytes -= len(item.body)
                slot[0] = None
                self.dropped += 1

    def fail(self, reason: str) -> None:
        """Give up on this connection (the writer raises SlowConsumer with ``reason``)."""
        if self.failed is None:
            self.failed = reason
            self._items = []
            self._by_key = None
            self._bytes = 0
            if self.on_due is not None:
                self.on_due(trio.current_time())
        self._wake()

    @property
    def due(self) -> float | None:
        """When the oldest waiting frame becomes overdue (None: nothing waits)."""
        return None if self._since is None else self._since + self.max_delay

    def overdue(self, now: float | None = None) -> bool:
        """True when the oldest waiting frame has waited ``max_delay`` or longer (by ``now``, trio's time)."""
        if self._since is None:
            return False
        return self._since + self.max_delay <= (trio.current_time() if now is None else now)  # as ``due``

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def get_batch(self) -> list[Outgoing]:
        """Wait for at least one item and take every waiting item. Raises SlowConsumer once failed.
        One consumer at a time (the connection's writer)."""
        while not self._items and self.failed is None:
            if self._waiter is not None:
                raise RuntimeError("Outbox.get_batch: another task is already waiting")
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        if self.failed is not None:
            raise SlowConsumer(self.failed)
        items = self._items
        self._items = []
        self._by_key = None
        self._bytes = 0
        self._since = None
        batch = [slot[0] for slot in items if slot[0] is not None]
        self.delivered += len(batch)
        return batch
