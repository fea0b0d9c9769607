"""Every connection's deadlines in one heap, served by one task: no periodic wake-up per connection.

A connection (anything with an ``armed`` float attribute) is ``arm``-ed for the moment its next deadline falls
due (heart-beat out, heart-beat in, CONNECT timeout, outbox overdue, the writer's close grace). When that moment
comes the service calls ``fire(conn)``, which does what is due and arms the connection again for its next real
deadline. An idle connection with 10 s heart-beats therefore costs one wake-up per 10 s (the heart-beat it has to
send anyway), and no task of its own.

A deadline may come with a ``slack``: it may be fired up to that many seconds early. The service sleeps until the
earliest deadline, then fires every connection whose deadline is within its slack of now: heart-beats due within a
second of each other share one wake-up (issue 11: 10,000 idle connections wake the service about once a second,
not 1,000 times).

``arm`` only ever moves a connection's deadline earlier; a later one is left to ``fire``, which recomputes it.
Entries made stale by an earlier ``arm`` stay in the heap and are skipped when they come up (``conn.armed`` no
longer matches), so the heap holds at most a few entries per connection. They hold the connection by a weak
reference: a closed connection is freed as it closes, not when its last stale entry comes up (web._gc).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

__all__ = ["Armable", "Timers"]


class Armable(Protocol):
    armed: float  # the deadline this connection is armed for (math.inf: none); it must take weak references


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any, float]] = []  # (deadline, order, weakref to the connection, slack)
        self._order = itertools.count()
        self._wake = trio.Event()
        self._sleeping_until = math.inf
        self._max_slack = 0.0  # the largest slack ever armed: how far ahead a wake-up looks

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, conn: Armable, when: float, slack: float = 0.0) -> None:
        """Make sure ``fire(conn)`` runs at ``when`` or earlier (but not before ``when - slack``)."""
        if when >= conn.armed:
            return
        conn.armed = when
        if slack > self._max_slack:
            self._max_slack = slack
        heapq.heappush(self._heap, (when, next(self._order), weakref.ref(conn), slack))
        if when < self._sleeping_until:
            self._wake.set()

    def disarm(self, conn: Armable) -> None:
        """``conn`` is gone: its heap entries are skipped from now on."""
        conn.armed = -math.inf

    async def run(self, fire: Callable[[Any], None]) -> None:
        """Serve the heap for ever: ``fire`` each connection whose deadline has come (it re-arms itself)."""
        heap = self._heap
        while True:
            now = trio.current_time()
            horizon = now + self._max_slack  # nothing later than this may fire now, whatever its slack
            early: list[tuple[float, int, Any, float]] = []  # not within its own slack: back into the heap after
            while heap and heap[0][0] <= horizon:
                entry = heapq.heappop(heap)
                when, _, ref, slack = entry
                conn = ref()
                if conn is None or conn.armed != when:  # gone, superseded by an earlier arm, or disarmed
                    continue
                if when - slack > now:
                    early.append(entry)
                    continue
                conn.armed = math.inf
                try:
                    fire(conn)
                except Exception:  # a bug costs that connection its timers, never every connection's
                    log.exception("timers: firing %r failed", conn)
            conn = None  # not held while asleep (web._gc: a closed connection is freed as it closes)
            for entry in early:
                heapq.heappush(heap, entry)
            self._sleeping_until = heap[0][0] if heap else math.inf
            if self._wake.is_set():
                self._wake = trio.Event()
            with trio.move_on_at(self._sleeping_until):
                await self._wake.wait()
            self._sleeping_until = -math.inf  # awake: an arm() needs no wake-up until we sleep again

    async def serve(self, fire: Callable[[Any], None], shutdown: trio.Event, on_shutdown: Callable[[], None]) -> None:
        """``run``, plus one call of ``on_shutdown`` once ``shutdown`` is set (not one waiter per connection)."""

        async def watch() -> None:
            await shutdown.wait()
            on_shutdown()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await self.run(fire)
