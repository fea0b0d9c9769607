"""The comfy actor's WebSocket client over a trio stream, read in the caller's own task.

Why not trio-websocket here: it runs a reader task per socket and hands every message to the caller over a memory
channel, so each of ComfyUI's messages (two per sampler step: ``progress_state`` and ``progress``) cost two task
switches before the actor could even look at it. Here ``receive_messages`` does one ``receive_some`` of up to
``RECEIVE_BYTES``, decodes it (``_frames.FrameDecoder``) and returns every complete message in it at once: the
caller filters, parses and reports them as one batch (BENCHMARKS.md, "Issue 11: ComfyUI ingest"). wsproto does the
opening handshake and encodes (masks) what we send.

Control frames are handled by the reader as they come: a ping is answered, a pong wakes ``ping()``, a close is
answered and raises ``SocketClosed`` (so does the end of the TCP stream: code 1006). Only one task reads (the
caller of ``receive_messages``, later ``aclose``); any task may send (a lock keeps frames whole). The TCP stream
belongs to the caller, which closes it however the socket ends.
"""

from __future__ import annotations

import itertools
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage
from wsproto.events import Ping as SendPing
from wsproto.events import Pong as SendPong
from wsproto.frame_protocol import CloseReason

from ._frames import NO_STATUS, Close, FrameDecoder, FrameError, Ping, Pong

__all__ = ["RECEIVE_BYTES", "HandshakeFailed", "HandshakeRejected", "SocketClosed", "WebSocket", "close_name"]

RECEIVE_BYTES: Final = 1 << 16  # one read: at full speed ComfyUI's frames arrive many to a read
NORMAL_CLOSURE: Final = 1000
ABNORMAL_CLOSURE: Final = 1006  # no close frame: the TCP stream just ended
MAX_RESPONSE_HEAD: Final = 1 << 16  # bytes of the handshake's HTTP response head


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

    def __init__(self, stream: trio.abc.Stream, conn: WSConnection, max_message: int, tail: bytes) -> None:
        self._stream = stream
        self._conn = conn  # after the handshake only encodes what we send
        self._frames = FrameDecoder(max_message)
        self._tail = tail  # bytes that came after the 101 response: the first frames
        self._send_lock = trio.Lock()
        self._pings = itertools.count()
        self._pongs: dict[bytes, trio.Event] = {}  # ping payload -> woken by its pong
        self.closed: SocketClosed | None = None

    @classmethod
    async def connect(cls, stream: trio.abc.Stream, host: str, resource: str, *, max_message: int) -> WebSocket:
        """The opening handshake on ``stream`` (no extensions, no subprotocol)."""
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(host=host, target=resource)))
        received = b""
        while (end := received.find(b"\r\n\r\n")) < 0:
            if len(received) > MAX_RESPONSE_HEAD:
                raise HandshakeFailed(f"no end of the HTTP response head within {MAX_RESPONSE_HEAD} bytes")
            data = bytes(await stream.receive_some(RECEIVE_BYTES))
            if not data:
                raise HandshakeFailed("connection closed during the WebSocket handshake")
            received += data
        conn.receive_data(received[: end + 4])  # the head only: what follows a 101 is ours to decode
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                return cls(stream, conn, max_message, received[end + 4 :])
            if isinstance(event, RejectConnection):
                raise HandshakeRejected(event.status_code)
        raise HandshakeFailed("incomplete HTTP response to the WebSocket upgrade")

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
            await self._send(self._conn.send(SendPing(payload=payload)))
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
        if self._tail:
            data, self._tail = self._tail, b""
        else:
            data = bytes(await self._stream.receive_some(RECEIVE_BYTES))  # bytes already: no copy
            if not data:  # the stream ended without a close frame
                raise self._set_closed(SocketClosed(ABNORMAL_CLOSURE, None))
        frames: list[str | bytes | Ping | Pong | Close]
        try:
            frames = self._frames.feed(data)
        except FrameError as exc:  # the server broke the protocol: we close, after what came before the fault
            await self._send_quietly(self._conn.send(CloseConnection(code=exc.code, reason=exc.reason)))
            closed = self._set_closed(SocketClosed(exc.code, exc.reason))
            frames = [frame for frame in exc.decoded if isinstance(frame, str | bytes)]
            if not frames:
                raise closed from exc
        messages: list[str | bytes] = []
        for frame in frames:
            if isinstance(frame, str | bytes):
                messages.append(frame)
            elif isinstance(frame, Ping):
                await self._send(self._conn.send(SendPong(payload=frame.payload)))
            elif isinstance(frame, Pong):
                if (pong := self._pongs.get(frame.payload)) is not None:
                    pong.set()
            elif isinstance(frame, Close):  # the server closed: answer it (echo its code), then we are closed
                code = NORMAL_CLOSURE if frame.code == NO_STATUS else frame.code
                await self._send_quietly(self._conn.send(CloseConnection(code=code)))
                closed = self._set_closed(SocketClosed(frame.code, frame.reason))
                if not messages:
                    raise closed
                break  # the messages before the close first; the next call raises
        return messages

    async def _send_quietly(self, data: bytes) -> None:
        """A close frame: the server may be gone already, which changes nothing."""
        try:
            await self._send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _set_closed(self, closed: SocketClosed) -> SocketClosed:
        self.closed = closed
        for pong in self._pongs.values():  # a ping waiting for its pong learns that none will come
            pong.set()
        return closed

    async def aclose(self) -> None:
        """Our close handshake: send a close frame and read (and drop) until the server answers or the stream ends.
        The caller bounds it in time and closes the TCP stream afterwards."""
        if self.closed is not None:
            return
        try:
            await self._send(self._conn.send(CloseConnection(code=NORMAL_CLOSURE)))
            data, self._tail = self._tail, b""
            while data or (data := bytes(await self._stream.receive_some(RECEIVE_BYTES))):
                if any(isinstance(frame, Close) for frame in self._frames.feed(data)):
                    break
                data = b""
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
            pass
        finally:
            self._set_closed(SocketClosed(NORMAL_CLOSURE, None))
