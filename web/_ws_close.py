"""Close a WebSocket that sent a malformed frame with its RFC 6455 code, instead of dropping the TCP connection.

wsproto turns a frame it cannot parse into a ``CloseConnection`` event carrying the right code (1007: a text frame
that is not UTF-8; 1002: RSV bits, an unmasked client frame, a bad opcode) but leaves its state ``OPEN``, and
Hypercorn 0.18 answers a close only in ``REMOTE_CLOSING``: it just ends the stream, so the client sees 1006. This
wraps ``WSStream._handle_events``: the parse failure is held back from Hypercorn, and once it has handled the
events before it, the close frame with wsproto's code is sent and the stream ended. Oversized messages are
Hypercorn's own path (it sends 1009). A private detail of Hypercorn: pyproject pins hypercorn to 0.18.x, and
``tests/test_ws_close.py`` checks the codes on a raw socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypercorn.protocol.ws_stream as _ws_stream
from hypercorn.protocol.events import StreamClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event

_original = _ws_stream.WSStream._handle_events


async def _handle_events(self: Any) -> None:
    failed: list[CloseConnection] = []
    events = self.connection.events

    def until_parse_failure() -> Iterator[Event]:
        for event in events():
            if isinstance(event, CloseConnection) and self.connection.state is ConnectionState.OPEN:
                failed.append(event)  # wsproto's ParseFailed: the peer did not send a close frame
                return
            yield event

    self.connection.events = until_parse_failure  # shadows the method on this instance only
    try:
        await _original(self)
    finally:
        del self.connection.events
    if failed:
        await self._send_wsproto_event(CloseConnection(code=failed[0].code, reason=(failed[0].reason or "")[:100]))
        await self.send(StreamClosed(stream_id=self.stream_id))


def install() -> None:
    _ws_stream.WSStream._handle_events = _handle_events  # type: ignore[method-assign]
