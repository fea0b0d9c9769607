"""Hypercorn's objects for one TCP connection, freed by reference counting as the connection ends (for web._gc).

Hypercorn 0.18 keeps each connection in a ring of objects that point at each other: its ``TCPServer`` holds a
``ProtocolWrapper`` built with ``send=self.protocol_send`` (a bound method, so a reference back), which holds an
``H11Protocol`` (or ``H2Protocol``) built with that ``send``, which holds the request's ``WSStream`` or
``HTTPStream`` built with ``send=self.stream_send``; the task group and the idle task hang off them too. Under a
``/ws`` connection our heart-beat tap (web._transport) and the WSStream point at each other as well. Only a
full collection frees such a ring (measured: ~55 objects, ~11 KB per closed WebSocket connection). The endpoint
freezes its connections out of full collections (web._gc), so without help every closed connection's ring would
stay in memory until a thaw, which is a full collection over every live connection (≈ 1.7 s of stall at 10,000).

``ReapingTCPServer`` is Hypercorn's ``TCPServer`` that, once its ``run`` has returned, empties the attribute dicts
of those four objects of its own (and has the tap let go of the WSStream). By then the connection is over: ``run``
returns after its task group (and every app task of the connection in it) has finished and the stream is closed,
so nothing uses them any more. Emptying a dict only drops references *from* the object: the shared ones it pointed at (the app, the config, the worker
context) are untouched. ``install`` puts it where ``hypercorn.trio.serve`` looks ``TCPServer`` up (a module
global of 0.18's ``hypercorn/trio/run.py``, pinned in pyproject.toml); if that is not there, it logs and leaves
Hypercorn as it is (closed connections then wait for web._gc's thaw).
"""

from __future__ import annotations

import logging
from typing import Any

import hypercorn.trio.run as _hypercorn_run
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger(__name__)

__all__ = ["ReapingTCPServer", "install", "reap"]


class ReapingTCPServer(TCPServer):
    async def run(self) -> None:
        try:
            await super().run()
        finally:
            reap(self)


def reap(tcp: Any) -> None:
    """Empty the attribute dicts of a finished connection's TCPServer, its protocol wrapper, the protocol and the
    protocol's last stream (whichever exist)."""
    wrapper = vars(tcp).get("protocol")
    protocol = vars(wrapper).get("protocol") if wrapper is not None else None
    stream = getattr(protocol, "stream", None) if protocol is not None else None
    if (tap_reap := getattr(vars(tcp).get("stream"), "reap", None)) is not None:
        tap_reap()  # a /ws connection's heart-beat tap (web._transport) and the WSStream it is tied to
    for obj in (stream, protocol, wrapper, tcp):
        if obj is not None and hasattr(obj, "__dict__"):
            vars(obj).clear()


def install() -> bool:
    """Make ``hypercorn.trio.serve`` use ``ReapingTCPServer``; False (logged) if its layout is not 0.18's."""
    if getattr(_hypercorn_run, "TCPServer", None) is ReapingTCPServer:
        return True
    if getattr(_hypercorn_run, "TCPServer", None) is not TCPServer:
        log.warning(
            "web: hypercorn.trio.run has no TCPServer to replace (layout changed?): closed connections are "
            "freed by web._gc's thaws only"
        )
        return False
    setattr(_hypercorn_run, "TCPServer", ReapingTCPServer)  # noqa: B010 - a module global it does not export
    return True
