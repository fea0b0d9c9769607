"""Cutting a WebSocket's TCP connection from inside the app, for a client that stopped reading.

Hypercorn writes every WebSocket message with a *shielded* ``send_all`` (``hypercorn/trio/tcp_server.py``
``TCPServer.protocol_send``). Once a client stops reading and the kernel buffers are full, ``websocket.send()``
blocks for ever and no cancel scope of ours can interrupt it (STACK-NOTES §2.6); ASGI has no "abort" message
either. The one way out is to close the socket underneath: handing ``protocol_send`` a ``Closed`` event closes
the stream, which wakes the stuck ``send_all`` with ``ClosedResourceError``; Hypercorn then reports the
disconnect to the app as for any dropped client (our handler is cancelled, its ``finally`` blocks run).

This reaches ``protocol_send`` through the private object layout of hypercorn 0.18 + quart-trio 0.12 (both pinned
in pyproject.toml), as ``scripts/fake_comfyui.py`` does for its abrupt closes: the quart ``Websocket``'s
``_send`` is ``partial(send_data, asgi_send)``, the ASGI send is ``WSStream.app_send``, whose stream's ``send``
is ``H11Protocol.stream_send``, whose protocol's ``send`` is ``TCPServer.protocol_send``.
``transport_closer`` returns None when the layout is not that one (the caller logs it and carries on).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from hypercorn.events import Closed

log = logging.getLogger(__name__)
_warned = False  # the layout check fails for every connection or none: say it once


def transport_closer(websocket: Any) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that closes ``websocket``'s TCP connection at once, or None if it cannot be found."""
    ws = websocket._get_current_object() if hasattr(websocket, "_get_current_object") else websocket
    send = getattr(ws, "_send", None)
    asgi_send = send.args[0] if isinstance(send, partial) and send.args else None
    ws_stream = getattr(asgi_send, "__self__", None)
    protocol = getattr(getattr(ws_stream, "send", None), "__self__", None)
    tcp_send = getattr(protocol, "send", None)
    if tcp_send is None or getattr(tcp_send, "__name__", "") != "protocol_send":
        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "ws: cannot reach the TCP stream under %r (hypercorn layout changed?): "
                "a client that stops reading will hold its connection until it goes away",
                ws,
            )
        return None
    return partial(tcp_send, Closed())


class TransportClosed(Exception):
    """The client side of a transport is unusable (e.g. it sent a SockJS message that is not JSON)."""


class StompTransport(Protocol):
    """What the STOMP endpoint needs from whatever carries it (a plain WebSocket, a SockJS session).

    ``receive`` returns the next message from the client (a client that went away shows up as the handler
    being cancelled, as with Quart's websockets, or as ``TransportClosed``); ``send`` carries one message (a
    batch of STOMP frames) and may block while the client is slow; ``close`` ends it with a WebSocket close
    code; ``abort`` (or None) cuts it at once when ``send`` is stuck on a client that stopped reading."""

    name: str
    abort: Callable[[], Awaitable[None]] | None

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class WebSocketTransport:
    """A Quart websocket (already accepted) as a ``StompTransport``."""

    name = "ws"

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket
        self.abort = transport_closer(websocket)

    async def receive(self) -> str | bytes:
        return await self._ws.receive()  # type: ignore[no-any-return]

    async def send(self, text: str) -> None:
        await self._ws.send(text)

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)
