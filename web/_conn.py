"""A STOMP connection's state as the endpoint (``web._ws``) keeps it, and the per-user connection counter."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.sessions import Outgoing

from ._outbox import Outbox
from ._transport import StompTransport
from .auth import Principal
from .stomp import StompConnection

__all__ = ["END", "END_MARKER", "RAW", "SUBPROTOCOLS", "Close", "Conn", "ConnectionCounter", "pick_subprotocol"]

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
RAW = "raw"  # Outgoing.type of an already-encoded control frame
END = "end"  # Outgoing.type of the marker after a connection's last frame (its ERROR or RECEIPT)
END_MARKER = Outgoing("", 0, b"", END)


class ConnectionCounter:
    """Live STOMP connections per user, for the per-user cap. Used only from the trio thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_user: dict[str, int] = {}

    def acquire(self, user_id: str) -> bool:
        n = self.by_user.get(user_id, 0)
        if n >= self.limit:
            return False
        self.by_user[user_id] = n + 1
        return True

    def release(self, user_id: str) -> None:
        n = self.by_user.get(user_id, 0) - 1
        if n > 0:
            self.by_user[user_id] = n
        else:
            self.by_user.pop(user_id, None)

    @property
    def total(self) -> int:
        return sum(self.by_user.values())


class Close(Exception):
    """Stop this connection after flushing: ``code`` is the WebSocket close code."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True, weakref_slot=True)  # web._gc keeps a weak reference to it once it closes
class Conn:
    id: int
    outbox: Outbox
    stomp: StompConnection
    principal: Principal | None = None
    client_id: str | None = None
    subs: dict[str, tuple[str, str]] = field(default_factory=dict)  # destination -> (subscription id, ack mode)
    prefixes: dict[str, bytes] = field(default_factory=dict)  # destination -> its MESSAGE headers (see _prefix)
    acks: dict[str, bool] = field(default_factory=dict)  # destination -> its frames carry an ``ack`` header
    last_rx: float = 0.0
    busy: bool = False  # the reader is handling a frame (e.g. waiting for the registry), not reading
    last_tx: float = 0.0
    send_every: float = 0.0  # seconds; 0 = no heart-beats
    expect_every: float = 0.0
    messages: int = 0
    close_after_flush: Close | None = None
    io: StompTransport | None = None  # what carries it (its ``abort`` cuts the TCP connection under a stuck writer)
    released: bool = False  # session detached and per-user slot given back
    tap: Any = None  # the HeartbeatTap under a /ws connection (web._transport), drained when its timer fires
    transport: str = "ws"  # what carries it: "ws", or "sockjs-<transport>"
    session_held: bool = False  # the hub accepted our Connect: a Disconnect is owed
    replays: deque[float] | None = None  # trio times of this connection's last-seq replays (made by the first)
    opened: float = 0.0
    armed: float = math.inf  # the deadline the shared Timers will fire us at (web._timers)
    condemned_at: float | None = None  # when the connection was doomed (the writer has CLOSE_GRACE from then)
    reading: bool = True  # False once closing: what the client sends now is not read (see web._ws._stop_reading)
    feeding: trio.CancelScope | None = None  # a frame being handled in quart's message task (pumped connections)
    fed: trio.Event | None = None  # set when that frame is done, for ``_stop_reading`` waiting on it

    def raw(self, data: bytes) -> None:
        self.outbox.put_nowait(Outgoing("", 0, data, RAW))


def pick_subprotocol(offered: list[str]) -> str | None:
    for proto in SUBPROTOCOLS:
        if proto in offered:
            return proto
    return None
