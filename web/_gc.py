"""When the endpoint freezes the garbage collector's view of its connections, and when it thaws it.

Thousands of connections are hundreds of thousands of long-lived GC-tracked objects (Hypercorn's, Quart's and
ours); every full collection walks all of them (≈ 2 s at 10,000 connections on the benchmark machine). So after a
burst of connects (``every`` opened since the last freeze) what is alive is frozen (``gc.freeze()``): full
collections stop scanning it.

The price: a frozen object is never collected, and a connection's objects form reference cycles, so a connection
that was alive at a freeze and closes later stays in memory. That garbage is bounded: once as many frozen
connections have closed as are alive (and at least ``every``), everything is thawed, collected in one full
collection and frozen again. Memory held by closed connections thus stays below what the live ones hold, and the
one long collection comes once per turnover of the whole population, not every few seconds.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Collection

log = logging.getLogger(__name__)

FREEZE_EVERY = 1000  # connections opened between two freezes

__all__ = ["FREEZE_EVERY", "FreezePolicy"]


class FreezePolicy:
    """Told of every connection opened and closed; freezes and thaws as above. ``frozen`` holds the ids of the
    connections that were alive at the last freeze (only those can leak)."""

    __slots__ = ("closed_frozen", "every", "frozen", "opened_since", "thaws")

    def __init__(self, every: int = FREEZE_EVERY) -> None:
        self.every = every
        self.opened_since = 0
        self.frozen: set[int] = set()
        self.closed_frozen = 0  # frozen connections closed since the last thaw: their garbage is kept
        self.thaws = 0

    def opened(self, live: Collection[int]) -> None:
        """A connection opened; ``live``: the ids of the open connections (this one included)."""
        self.opened_since += 1
        if self.opened_since >= self.every:
            self.opened_since = 0
            gc.collect(1)  # the young garbage goes first: only what survived two collections is frozen
            gc.freeze()
            self.frozen.update(live)

    def closed(self, conn_id: int, live: Collection[int]) -> None:
        """``conn_id`` closed; ``live``: the ids of the connections still open."""
        if conn_id not in self.frozen:
            return
        self.frozen.discard(conn_id)
        self.closed_frozen += 1
        if self.closed_frozen >= max(self.every, len(live)):
            self.thaw(live)

    def thaw(self, live: Collection[int]) -> None:
        """Collect what closed frozen connections left, then freeze what is alive again."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.frozen = set(live)
        self.closed_frozen = 0
        self.thaws += 1
        log.info(
            "gc: thawed, collected %d objects of closed connections in %.0f ms, froze again",
            found,
            1000 * (time.perf_counter() - started),
        )
