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

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio
from hypercorn.events import Closed
from hypercorn.protocol.ws_stream import ASGIWebsocketState
from quart_trio.asgi import TrioASGIWebsocketConnection
from wsproto.connection import ConnectionState as WsState

log = logging.getLogger(__name__)
_warned = False  # the layout check fails for every connection or none: say it once
_CONNECTED = ASGIWebsocketState.CONNECTED
_WS_OPEN = WsState.OPEN


def _current(websocket: Any) -> Any:
    """The websocket object itself under quart's context-local proxy (or ``websocket`` if it is not one)."""
    return websocket._get_current_object() if hasattr(websocket, "_get_current_object") else websocket


def _layers(websocket: Any) -> tuple[Any, Any] | None:
    """(Hypercorn's ``WSStream``, its ``TCPServer``) under a quart websocket, or None if the layout is not 0.18's."""
    ws = _current(websocket)
    send = getattr(ws, "_send", None)
    asgi_send = send.args[0] if isinstance(send, partial) and send.args else None
    ws_stream = getattr(asgi_send, "__self__", None)
    protocol = getattr(getattr(ws_stream, "send", None), "__self__", None)
    tcp_send = getattr(protocol, "send", None)
    if tcp_send is None or getattr(tcp_send, "__name__", "") != "protocol_send":
        return None
    return ws_stream, tcp_send.__self__


def transport_closer(websocket: Any) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that closes ``websocket``'s TCP connection at once, or None if it cannot be found."""
    layers = _layers(websocket)
    if layers is None:
        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "ws: cannot reach the TCP stream under %r (hypercorn layout changed?): "
                "a client that stops reading will hold its connection until it goes away",
                websocket,
            )
        return None
    return partial(layers[1].protocol_send, Closed())


class TransportClosed(Exception):
    """The client side of a transport is unusable (e.g. it sent a SockJS message that is not JSON)."""


class StompTransport(Protocol):
    """What the STOMP endpoint needs from whatever carries it (a plain WebSocket, a SockJS session).

    ``receive`` returns the next message from the client (a client that went away shows up as the handler
    being cancelled, as with Quart's websockets, or as ``TransportClosed``); ``send`` carries one message (a
    batch of STOMP frames) and may block while the client is slow; ``close`` ends it with a WebSocket close
    code; ``abort`` (or None) cuts it at once when ``send`` is stuck on a client that stopped reading."""

    name: str

    @property
    def abort(self) -> Callable[[], Awaitable[None]] | None: ...

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


# A heart-beat as a whole WebSocket message: FIN + text opcode, unmasked (server to client), the 1-byte payload "\n"
HEARTBEAT_MESSAGE = b"\x81\x01\n"


def write_heartbeat(ws_stream: Any, send_lock: trio.Lock, sock: socket.socket) -> bool:
    """``HEARTBEAT_MESSAGE`` straight into ``sock`` if Hypercorn's WebSocket ``ws_stream`` is open and nothing is
    being written (``send_lock`` free: no message is half sent). False: not now (full, or the peer is gone: the
    ordinary path finds out). A partial write leaves the stream broken: TransportClosed."""
    if ws_stream.closed or ws_stream.state is not _CONNECTED or send_lock.locked():
        return False
    try:
        sent = sock.send(HEARTBEAT_MESSAGE)
    except OSError:  # BlockingIOError included
        return False
    if sent != len(HEARTBEAT_MESSAGE):
        raise TransportClosed(f"heart-beat written in part ({sent} of {len(HEARTBEAT_MESSAGE)} bytes)")
    return True


class WebSocketTransport:
    """A Quart websocket (already accepted) as a ``StompTransport``. Small: an idle connection holds one."""

    __slots__ = ("_layers", "_ws")
    name = "ws"

    def __init__(self, websocket: Any) -> None:
        self._ws = _current(websocket)
        self._layers: tuple[Any, Any] | None = None  # (WSStream, TCPServer), found on first use

    def _found(self) -> tuple[Any, Any] | None:
        if self._layers is None:
            self._layers = _layers(self._ws)
        return self._layers

    @property
    def abort(self) -> Callable[[], Awaitable[None]] | None:
        return transport_closer(self._ws)

    async def receive(self) -> str | bytes:
        return await self._ws.receive()  # type: ignore[no-any-return]

    async def send(self, text: str) -> None:
        await self._ws.send(text)

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)

    def send_heartbeat_nowait(self) -> bool:
        """Write a heart-beat straight into the socket, past quart, Hypercorn and wsproto: no task wakes, nothing
        is allocated. Only when nothing else is being written (Hypercorn's send lock is free, so no message is half
        sent) and the WebSocket is open; the caller makes sure nothing of its own is queued. False: not possible
        now (the caller queues the heart-beat the ordinary way). A partial write (the kernel's buffer full to the
        byte) leaves the stream broken: TransportClosed, and the caller cuts the connection."""
        layers = self._found()
        if layers is None:
            return False
        ws_stream, tcp = layers
        stream = tcp.stream
        try:
            sock = stream.raw if type(stream) is HeartbeatTap else stream.socket._sock  # the stdlib socket
        except AttributeError:
            return False
        return write_heartbeat(ws_stream, tcp.send_lock, sock)

    def tap_heartbeats(self, inbox: PumpInbox) -> HeartbeatTap | None:
        """Put a ``HeartbeatTap`` under this WebSocket: from now on it counts the messages given to the app, and
        once its ``hook`` is set it hands the client's lone heart-beats to it as they come off the socket. Called
        before the WebSocket is accepted, so no message can have gone by uncounted. None: the layout is not
        Hypercorn 0.18's on a plain TCP socket (e.g. TLS), and nothing changes."""
        layers = self._found()
        if layers is None:
            return None
        ws_stream, tcp = layers
        h11 = getattr(ws_stream.send, "__self__", None)
        stream = getattr(tcp, "stream", None)
        app_put = getattr(ws_stream, "app_put", None)
        if h11 is None or type(stream) is not trio.SocketStream or app_put is None:
            return None
        tap = HeartbeatTap(stream, h11, ws_stream, app_put, tcp.send_lock)
        inbox.tap = tap
        ws_stream.app_put = tap.app_put
        tcp.stream = tap
        return tap


# =============================================================================================================
# A client's heart-beat read below Hypercorn (issue 11: 10,000 idle connections, ≤ 3% of a core)
# =============================================================================================================


def lone_heartbeat(data: bytes) -> str | None:
    """The STOMP heart-beat in ``data`` if ``data`` is exactly one masked client-to-server WebSocket text frame
    whose payload is a lone EOL (``"\\n"`` or ``"\\r\\n"``): FIN + text opcode, the mask bit + length 1 or 2, a
    4-byte mask, the masked payload (RFC 6455 §5.2). None for anything else."""
    n = len(data)
    if n == 7:
        if data[0] == 0x81 and data[1] == 0x81 and data[6] ^ data[2] == 0x0A:
            return "\n"
    elif n == 8 and data[0] == 0x81 and data[1] == 0x82 and data[6] ^ data[2] == 0x0D and data[7] ^ data[3] == 0x0A:
        return "\r\n"
    return None


def lone_heartbeats(data: bytes) -> list[str] | None:
    """The heart-beats in ``data`` if it is nothing but whole heart-beat frames (``lone_heartbeat``) one after the
    other, as a resting connection's socket holds them; None for anything else (and for nothing)."""
    beats: list[str] = []
    i, n = 0, len(data)
    while i < n:
        size = 8 if n - i >= 8 and data[i + 1] == 0x82 else 7
        beat = lone_heartbeat(data[i : i + size])
        if beat is None:
            return None
        beats.append(beat)
        i += size
    return beats or None


REST_LOWAT = 8  # bytes a resting connection's socket must hold to wake its reader: more than one heart-beat frame
DRAIN_PEEK = 1024  # bytes ``drain`` looks at: 146 heart-beats (a client sends one per period)


class HeartbeatTap:
    """Stands in for the TCP stream under one upgraded ``/ws`` connection (``TCPServer.stream``, which Hypercorn's
    reader task asks for every chunk of bytes from the socket). A chunk that is nothing but client heart-beats,
    arriving while nothing is half-way through the layers above (no partial frame in wsproto, no fragment in
    Hypercorn's message buffer, no bytes in its HTTP/1.1 buffer, no earlier message still on its way to the STOMP
    parser), goes to ``hook`` and the tap waits for the next chunk: Hypercorn's reader loop, h11, wsproto, the ASGI
    queue and quart's message task never see it. Everything else, and a heart-beat ``hook`` declines (False), is
    returned to Hypercorn as ``receive_some`` of trio's ``SocketStream`` returns it; every other use of the stream
    (``send_all``, ``send_eof``, ``aclose``) goes to the stream itself.

    **Resting.** ``lazy`` is set when CONNECT has agreed that we send heart-beats, so the connection's own timer
    fires at least once per period. A lazy connection *rests* after a heart-beat it took, and from the first time
    its timer finds nothing half-way (``rest``: so a client whose last frame was its SUBSCRIBE rests before its
    first heart-beat): its socket's ``SO_RCVLOWAT`` is raised to ``REST_LOWAT`` bytes, so the kernel wakes the
    reader only for more than one heart-beat's worth of bytes (any STOMP frame, a close frame with a code), for the
    end of the stream or an error, and not for a lone heart-beat. The timer, which fires anyway to send the
    server's heart-beat (every ~10 s), calls ``drain``: the heart-beats that came meanwhile are read and taken
    there, in the same wake-up as hundreds of other connections'. An idle connection thus costs no wake-up of its
    own at all. The price: a frame of fewer than ``REST_LOWAT`` bytes that is not a heart-beat (an empty ping or
    close frame) from a resting client waits for that timer (``drain`` then wakes the reader for it).

    Measured (BENCHMARKS.md, "10,000 idle connections"): receiving a heart-beat through Hypercorn, wsproto and the
    ASGI queue was most of an idle connection's CPU, and waking a task for it on its own is already about the
    3% of a core 10,000 connections may take. Reaches into the private layout of hypercorn 0.18, wsproto 1.2
    and trio's socket (pinned in pyproject.toml); ``_quiet`` is False (the usual path) if that layout is not what
    it expects."""

    __slots__ = (
        "_h11", "_put", "_send_lock", "_stream", "_ws", "hook", "lazy", "put", "raw", "resting", "taken",
    )  # fmt: skip

    def __init__(
        self, stream: Any, h11: Any, ws_stream: Any, app_put: Callable[[Any], Awaitable[None]], send_lock: trio.Lock
    ) -> None:
        self._stream = stream  # trio's SocketStream, Hypercorn's ``TCPServer.stream``
        self._send_lock = send_lock  # Hypercorn's, held while it writes a message (``TCPServer.send_lock``)
        self.raw: socket.socket = stream.socket._sock  # the stdlib socket under it (non-blocking)
        self._h11 = h11  # Hypercorn's H11Protocol (its ``connection`` is the upgraded H11WSConnection)
        self._ws = ws_stream  # Hypercorn's WSStream, whose ``connection`` is the wsproto Connection
        self._put = app_put  # the ASGI receive queue's send
        self.hook: Callable[[str], bool] | None = None  # set once the STOMP endpoint reads this WebSocket's messages
        self.lazy = False  # may rest (see the class docstring); set by CONNECT when we send heart-beats
        self.resting = False  # SO_RCVLOWAT is REST_LOWAT: heart-beats wait for ``drain``
        self.put = 0  # messages given to the app (the ASGI queue) ...
        self.taken = 0  # ... and taken from quart by ``PumpInbox.send``: equal when none is on its way

    def __getattr__(self, name: str) -> Any:  # anything else Hypercorn (or send_heartbeat_nowait) asks of its stream
        return getattr(self._stream, name)

    def reap(self) -> None:
        """The TCP connection is over (web._reap): Hypercorn's WSStream, which points back at us (its ``app_put`` is
        ours), lets go of everything, so reference counting frees the connection's objects."""
        if hasattr(self._ws, "__dict__"):
            vars(self._ws).clear()

    async def app_put(self, message: Any) -> None:
        if message["type"] == "websocket.receive":
            self.put += 1
        await self._put(message)

    def take(self, data: bytes, *, quiet: bool = False) -> bool:
        """True if ``data`` is nothing but heart-beats, each taken by ``hook`` (they go no further). This runs in
        Hypercorn's reader task, where an exception would end more than this connection: a failure of the hook
        is logged and the bytes go the usual way. ``quiet``: the caller knows ``_quiet`` holds."""
        hook = self.hook
        if hook is None:
            return False
        try:
            if len(data) == 7:  # the usual case, one "\n" heart-beat
                text = lone_heartbeat(data)
                return text is not None and (quiet or self._quiet()) and hook(text)
            beats = lone_heartbeats(data)
            if beats is None or not (quiet or self._quiet()):
                return False
            for i, text in enumerate(beats):
                if not hook(text):
                    if i:  # cannot happen (hook declines only when closing or mid-frame, for all of them alike)
                        log.warning("heart-beat tap: %d of %d heart-beats taken, the rest dropped", i, len(beats))
                    return i > 0
            return True
        except Exception:
            log.exception("heart-beat tap: taking a heart-beat failed; it goes the usual way")
            return False

    def _lowat(self, resting: bool) -> None:
        try:
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, REST_LOWAT if resting else 1)
        except OSError:  # closed under us: the reader finds out
            return
        self.resting = resting

    def send_heartbeat(self) -> bool:
        """``WebSocketTransport.send_heartbeat_nowait`` for a tapped connection, with what it needs at hand."""
        return write_heartbeat(self._ws, self._send_lock, self.raw)

    def rest(self) -> None:
        """Let a ``lazy`` connection rest now, whatever its last frame was, if nothing is half-way through the
        layers above (its timer calls this, so a client whose last frame was its SUBSCRIBE does not wake its reader
        for its first heart-beat)."""
        if not self.resting and self.lazy and self.hook is not None and self._quiet():
            self._lowat(True)

    def drain(self) -> bool:
        """Look at what a resting connection's socket holds (its timer calls this): if it is all heart-beats they
        are read and taken; anything else (or the end of the stream) stays for the reader, which stops resting
        (the kernel wakes it at once). True when the client sent anything since the last read (it is not silent).
        Never blocks."""
        if not self.resting:
            return False
        raw = self.raw
        try:
            data = raw.recv(DRAIN_PEEK, socket.MSG_PEEK)  # read for good below only if it is all heart-beats
        except BlockingIOError:
            return False
        except OSError:  # reset: the reader sees the end of the stream
            data = b""
        # No ``_quiet`` here: a connection rests only from a moment ``_quiet`` held, and until it stops resting no
        # byte of its stream reaches the layers above (the reader leaves rest before it reads), so it still holds.
        if data and self.take(data, quiet=True):
            try:
                raw.recv(len(data))  # those very bytes: nothing else reads this socket while it rests
            except OSError:  # reset meanwhile: an error wakes the reader whatever the mark
                pass
            return True
        self._lowat(False)  # anything else stays for the reader, whom the kernel wakes for it now
        return bool(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """``SocketStream.receive_some``, less the heart-beats ``hook`` takes. Waits for the socket first (an idle
        connection's next chunk is not there yet). Errors as trio's: ``ClosedResourceError`` once the socket is
        closed (also while waiting), ``BrokenResourceError`` for any other socket error."""
        raw = self.raw
        size = max_bytes or 65536
        while True:
            if raw.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed")
            await trio.lowlevel.wait_readable(raw)  # a resting socket wakes us when ``drain`` lowers its SO_RCVLOWAT
            if self.resting:
                self._lowat(False)
            try:
                data = raw.recv(size)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    raise trio.ClosedResourceError("this socket was already closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if self.take(data):
                if self.lazy:
                    self._lowat(True)
                continue
            return data

    def _quiet(self) -> bool:
        """Nothing is half-way through the layers above: a heart-beat taken now is in its place in the stream."""
        ws = self._ws
        try:
            conn = ws.connection
            proto = conn._proto
            decoder = proto._frame_decoder
            return (
                self.put == self.taken
                and ws.state is _CONNECTED
                and not ws.closed
                and ws.buffer.value is None
                and conn.state is _WS_OPEN
                and not conn._events
                and decoder.header is None
                and not decoder.buffer.buffer
                and proto._message_decoder.opcode is None
                and not proto.extensions
                and not self._h11.connection.buffer
            )
        except AttributeError:
            return False


# =============================================================================================================
# Incoming messages without a channel and a reader task (issue 11: 10,000 idle connections)
# =============================================================================================================

QUART_QUEUE = 10  # what quart-trio's own receive channel holds (``TrioASGIWebsocketConnection``)
Pump = Callable[[str | bytes], Awaitable[None]]


class PumpInbox:
    """Where quart puts a websocket's incoming messages: quart-trio's memory channel, made only when something uses
    it, or, once ``claim``-ed, a ``pump`` awaited in quart's own message task. The STOMP endpoint claims it, so an
    idle connection has neither a channel nor a reader task of its own (about 5 KB), and a message reaches the
    STOMP parser without a hop between tasks."""

    __slots__ = ("_rx", "_tx", "pump", "tap")

    def __init__(self) -> None:
        self._tx: trio.MemorySendChannel[str | bytes] | None = None
        self._rx: trio.MemoryReceiveChannel[str | bytes] | None = None
        self.pump: Pump | None = None
        self.tap: HeartbeatTap | None = None  # counts what quart hands on (WebSocketTransport.tap_heartbeats)

    def _channel(self) -> tuple[trio.MemorySendChannel[str | bytes], trio.MemoryReceiveChannel[str | bytes]]:
        if self._tx is None or self._rx is None:
            self._tx, self._rx = trio.open_memory_channel[str | bytes](QUART_QUEUE)
        return self._tx, self._rx

    def claim(self, pump: Pump) -> bool:
        """From now on every message goes to ``pump``; False (and nothing changes) when the channel is already in
        use (a message came first, or someone reads with ``receive``)."""
        if self._tx is not None:
            return False
        self.pump = pump
        return True

    async def send(self, message: str | bytes) -> None:  # quart's message task, one message at a time
        if self.tap is not None:
            self.tap.taken += 1
        if self.pump is not None:
            await self.pump(message)
        else:
            await self._channel()[0].send(message)

    async def receive(self) -> str | bytes:  # quart's ``websocket.receive()``
        return await self._channel()[1].receive()


class PumpedWebsocketConnection(TrioASGIWebsocketConnection):
    """quart-trio's websocket connection with a ``PumpInbox`` in place of its memory channel (both of its ends).
    Set as the app's ``asgi_websocket_class`` by ``web.server``; every other route reads as before."""

    def __init__(self, app: Any, scope: Any) -> None:  # quart-trio's __init__, minus the channel
        self.app = app
        self.scope = scope
        self._accepted = False
        self._closed = False
        inbox = PumpInbox()
        self.send_channel = self.receive_channel = inbox  # type: ignore[assignment]


def pump_inbox(websocket: Any) -> PumpInbox | None:
    """The ``PumpInbox`` under a quart websocket, or None (another ASGI connection class, e.g. the test client)."""
    ws = _current(websocket)
    inbox = getattr(getattr(ws, "_receive", None), "__self__", None)
    return inbox if isinstance(inbox, PumpInbox) else None
