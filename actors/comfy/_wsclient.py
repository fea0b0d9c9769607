"""The comfy actor's WebSocket client: wsproto (sans-IO) over a trio stream, read in the caller's own task.

Why not trio-websocket here: it runs a reader task per socket and hands every message to the caller over a memory
channel, so each of ComfyUI's messages (two per sampler step: ``progress_state`` and ``progress``) cost two task
switches before the actor could even look at it. Here ``receive_messages`` does one ``receive_some`` of up to
``RECEIVE_BYTES``, feeds it to wsproto and returns every complete message in it at once: the caller filters, parses
and reports them as one batch (BENCHMARKS.md, "Issue 11: ComfyUI ingest").

Control frames are handled by the reader as they come: a ping is answered, a pong wakes ``ping()``, a close is
answered and raises ``SocketClosed`` (so does the end of the TCP stream: code 1006). Only one task reads (the
caller of ``receive_messages``, later ``aclose``); any task may send (a lock keeps frames whole). The TCP stream
belongs to the caller, which closes it however the socket ends.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

__all__ = ["RECEIVE_BYTES", "HandshakeFailed", "HandshakeRejected", "SocketClosed", "WebSocket", "close_name"]

RECEIVE_BYTES: Final = 1 << 16  # one read: at full speed ComfyUI's frames arrive many to a read
NORMAL_CLOSURE: Final = 1000
ABNORMAL_CLOSURE: Final = 1006  # no close frame: the TCP stream just ended
MESSAGE_TOO_BIG: Final = 1009


def close_name(code: int) -> str:
    """RFC 6455's name of a close code (wsproto's names; the reserved ranges by range)."""
    try:
        return CloseReason(code).name
    except ValueError:
        if 1000 <= code <= 2999:
            return "RFC_RESERVED"
        if 3000 <= code <= 3999:
            return "IANA_RESERVED"
        if 4000 <= code <= 4999:
            return "PRIVATE_RESERVED"
        return "INVALID_CODE"


class SocketClosed(Exception):
    """The WebSocket is closed: by the server (its code and reason), by us, or by the TCP stream ending (1006)."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"{code} {close_name(code)}" + (f" {reason}" if reason else ""))
        self.code = code
        self.name = close_name(code)
        self.reason = reason or None


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class HandshakeFailed(Exception):
    """The TCP stream ended during the upgrade."""


class WebSocket:
    """One open client WebSocket (after ``connect``). Text messages are ``str``, binary ones ``bytes``."""

    def __init__(self, stream: trio.abc.Stream, conn: WSConnection, max_message: int) -> None:
        self._stream = stream
        self._conn = conn
        self._max_message = max_message
        self._send_lock = trio.Lock()
        self._parts: list[Any] = []  # str or bytes-like, all of one kind  # the fragments of an unfinished message
        self._part_bytes = 0
        self._pings = itertools.count()
        self._pongs: dict[bytes, trio.Event] = {}  # ping payload -> woken by its pong
        self.closed: SocketClosed | None = None
        self._handshake_tail = True

    @classmethod
    async def connect(cls, stream: trio.abc.Stream, host: str, resource: str, *, max_message: int) -> WebSocket:
        """The opening handshake on ``stream`` (no extensions, no subprotocol). Frames that came with the 101
        stay in wsproto's buffer for the first ``receive_messages``."""
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(host=host, target=resource)))
        while True:
            data = bytes(await stream.receive_some(RECEIVE_BYTES))
            if not data:
                raise HandshakeFailed("connection closed during the WebSocket handshake")
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, AcceptConnection):
                    return cls(stream, conn, max_message)
                if isinstance(event, RejectConnection):
                    raise HandshakeRejected(event.status_code)

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send_text(self, message: str) -> None:
        if self.closed is not None:
            raise self.closed
        await self._send(self._conn.send(TextMessage(data=message)))

    async def ping(self) -> None:
        """Send a ping and wait for its pong (which the reading task receives). Raises ``SocketClosed``."""
        if self.closed is not None:
            raise self.closed
        payload = next(self._pings).to_bytes(8, "big")
        self._pongs[payload] = pong = trio.Event()
        try:
            await self._send(self._conn.send(Ping(payload=payload)))
            await pong.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SocketClosed(ABNORMAL_CLOSURE, "the TCP stream broke") from None
        finally:
            self._pongs.pop(payload, None)
        if self.closed is not None:
            raise self.closed

    async def receive_messages(self) -> list[str | bytes]:
        """The complete messages in the next read from the socket, in order; may be empty (only control frames or a
        part of a message came). Messages that came before a close are returned first; the next call raises
        ``SocketClosed``."""
        if self.closed is not None:
            raise self.closed
        if self._handshake_tail:  # frames that came with the 101 wait in wsproto's buffer
            self._handshake_tail = False
            if messages := await self._messages():
                return messages
        data = bytes(await self._stream.receive_some(RECEIVE_BYTES))  # bytes already: no copy
        self._conn.receive_data(data or None)  # None: the end of the stream, a close without close frame (1006)
        return await self._messages()

    async def _messages(self) -> list[str | bytes]:
        messages: list[str | bytes] = []
        for event in self._conn.events():
            if isinstance(event, TextMessage | BytesMessage):
                if event.message_finished and not self._parts:
                    message: str | bytes = event.data if isinstance(event.data, str | bytes) else bytes(event.data)
                else:
                    self._parts.append(event.data)
                    self._part_bytes += len(event.data)
                    if not event.message_finished:
                        if self._part_bytes > self._max_message:
                            await self._close(MESSAGE_TOO_BIG, f"message over {self._max_message} bytes")
                            break
                        continue
                    parts, self._parts, self._part_bytes = self._parts, [], 0
                    message = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                if len(message) > self._max_message:
                    await self._close(MESSAGE_TOO_BIG, f"message over {self._max_message} bytes")
                    break
                messages.append(message)
            elif isinstance(event, Ping):
                await self._send(self._conn.send(event.response()))
            elif isinstance(event, Pong):
                if (pong := self._pongs.get(bytes(event.payload))) is not None:
                    pong.set()
            elif isinstance(event, CloseConnection):
                if self._conn.state is ConnectionState.REMOTE_CLOSING:  # the server closed: answer it
                    await self._send_quietly(self._conn.send(event.response()))
                    self._set_closed(SocketClosed(int(event.code), event.reason))
                elif self._conn.state is ConnectionState.OPEN:  # wsproto could not parse a frame: we close
                    await self._close(int(event.code), event.reason)
                else:  # the stream ended without a close frame
                    self._set_closed(SocketClosed(int(event.code), event.reason))
                break
        if self.closed is not None and not messages:
            raise self.closed
        return messages

    async def _send_quietly(self, data: bytes) -> None:
        """A close frame: the server may be gone already, which changes nothing."""
        try:
            await self._send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _close(self, code: int, reason: str | None) -> None:
        """We close the socket because of what the server sent."""
        await self._send_quietly(self._conn.send(CloseConnection(code=code, reason=reason)))
        self._set_closed(SocketClosed(code, reason))

    def _set_closed(self, closed: SocketClosed) -> None:
        self.closed = closed
        for pong in self._pongs.values():  # a ping waiting for its pong learns that none will come
            pong.set()

    async def aclose(self) -> None:
        """Our close handshake: send a close frame and read (and drop) until the server answers or the stream ends.
        The caller bounds it in time and closes the TCP stream afterwards."""
        if self.closed is not None:
            return
        try:
            await self._send(self._conn.send(CloseConnection(code=NORMAL_CLOSURE)))
            while data := bytes(await self._stream.receive_some(RECEIVE_BYTES)):
                self._conn.receive_data(data)
                if any(isinstance(event, CloseConnection) for event in self._conn.events()):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._set_closed(SocketClosed(NORMAL_CLOSURE, None))
