"""When the endpoint freezes the garbage collector's view of its connections, and when it thaws it.

Thousands of connections are hundreds of thousands of long-lived GC-tracked objects (Hypercorn's, Quart's and
ours); every full collection walks all of them (≈ 2 s at 10,000 connections on the benchmark machine). So after
every ``every`` connects what is alive is frozen (``gc.freeze()``): full collections stop scanning it, and scan
only what opened since.

The price: a frozen object is never *collected*. It is still freed by reference counting, so a connection that
was alive at a freeze and closes later costs nothing if its objects hold no reference cycle; one whose objects a
cycle keeps alive stays in memory. Since session 6 a closed connection holds none: the endpoint cuts what points
back at its ``Conn`` (web._ws), and Hypercorn's own ring of objects per TCP connection is cut once it is done
(web._reap). Measured: no cyclic garbage per closed connection (clean close, killed client, protocol error), and the
server's RSS flat over three turnovers of 10,000 connections (it grew by ~11 KB per connection per turnover
before); ``tests/test_stomp_endpoint.py`` checks that closed connections are freed with the collector off.

The same holds for SockJS sessions, over a WebSocket or HTTP polling (web.sockjs raises the ``Cancelled`` of a
session whose client left on its own, not in an exception group that Quart's error handler would keep in a cycle,
and its HTTP sessions hold no bound method of their own; ``tests/test_closed_sessions_gc.py``). So only closed
frozen connections still alive some time after they closed (a weak reference to each tells) count as kept garbage.
Once as many are kept as connections are alive (and at least ``every``), everything is thawed, collected in one
full collection (≈ 1.7 s at 10,000 connections) and frozen again. Memory held by closed connections thus stays
below what the live ones hold, and the long collection comes only when cycles really pile up, not once per
turnover of the population (which it cost until session 6, and for SockJS until session 7).
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Collection

log = logging.getLogger(__name__)

# Connections opened between two freezes. What opened since the last freeze is scanned by every automatic full
# collection: measured over a turnover of 10,000 connections (bench_relay.py --paths idle --churn, session 6), 29
# full collections of up to 117 ms at 1,000; 6 of up to 7.3 ms at 100. A freeze costs a generation-1 collection.
FREEZE_EVERY = 100

__all__ = ["FREEZE_EVERY", "FreezePolicy"]


class FreezePolicy:
    """Told of every connection opened and closed; freezes and thaws as above. ``frozen`` holds the ids of the
    connections that were alive at the last freeze (only those can leak); ``kept`` a weak reference to each that
    closed since, pruned of the freed ones when it has grown enough to matter."""

    __slots__ = ("check_at", "every", "frozen", "kept", "opened_since", "thaws")

    def __init__(self, every: int = FREEZE_EVERY) -> None:
        self.every = every
        self.opened_since = 0
        self.frozen: set[int] = set()
        self.kept: list[weakref.ref[object]] = []  # closed frozen connections, not yet seen freed
        self.check_at = every  # prune ``kept`` when it is this long (doubles with survivors: O(1) per close)
        self.thaws = 0

    def opened(self, live: Collection[int]) -> None:
        """A connection opened; ``live``: the ids of the open connections (this one included)."""
        self.opened_since += 1
        if self.opened_since >= self.every:
            self.opened_since = 0
            gc.collect(1)  # the young garbage goes first: only what survived two collections is frozen
            gc.freeze()
            self.frozen.update(live)

    def closed(self, conn_id: int, conn: object, live: Collection[int]) -> None:
        """``conn`` (id ``conn_id``) closed; ``live``: the ids of the connections still open. (A thaw run from here
        cannot collect ``conn`` itself, which its caller still holds: the next thaw does, if it holds a cycle.)"""
        if conn_id not in self.frozen:
            return
        self.frozen.discard(conn_id)
        self.kept.append(weakref.ref(conn))
        if len(self.kept) < max(self.check_at, len(live)):
            return
        self.kept = [ref for ref in self.kept if ref() is not None]  # the freed ones held no cycle
        if len(self.kept) >= max(self.every, len(live)):
            self.thaw(live)
        else:
            self.check_at = max(self.every, 2 * len(self.kept))

    def thaw(self, live: Collection[int]) -> None:
        """Collect what closed frozen connections left, then freeze what is alive again."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.frozen = set(live)
        self.kept = []
        self.check_at = self.every
        self.thaws += 1
        log.info(
            "gc: thawed, collected %d objects of closed connections in %.0f ms, froze again",
            found,
            1000 * (time.perf_counter() - started),
        )
