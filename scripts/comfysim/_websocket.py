"""The WebSocket side: one socket's outbox, ComfyUI's frames, and the endpoint with its clientId routing."""

from __future__ import annotations

import itertools
import json
import logging
import struct
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.events import Closed as TransportClosed

from ._constants import (
    BINARY_PREVIEW_IMAGE,
    BINARY_PREVIEW_IMAGE_WITH_METADATA,
    BINARY_TEXT,
    IMAGE_FORMAT_PNG,
    OUTBOX_MAX_FRAMES,
    SERVER_FEATURES,
)
from ._net import _origin_forbidden

if TYPE_CHECKING:
    from ._server import FakeComfyUI

log = logging.getLogger("fake_comfyui")

# --- WebSocket connections ----------------------------------------------------------------------------

AsgiReceive = Callable[[], Awaitable[dict[str, Any]]]
AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]


def _abrupt_closer(asgi_send: AsgiSend) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that cuts this WebSocket's TCP connection without a close frame, or None.

    ASGI cannot do that (``websocket.close`` always sends a close frame), but a dropped connection must look like
    a network failure (the client sees 1006). With hypercorn 0.18 (pinned in pyproject.toml) the ASGI ``send`` is
    ``WSStream.app_send``; that stream's ``send`` is ``H11Protocol.stream_send``, and that protocol's ``send`` is
    ``TCPServer.protocol_send``, which closes the socket when handed a ``Closed`` event. Returns None if the
    layout is not that one; the caller then falls back to a close frame.
    """
    ws_stream = getattr(asgi_send, "__self__", None)
    h11_protocol = getattr(getattr(ws_stream, "send", None), "__self__", None)
    tcp_send = getattr(h11_protocol, "send", None)
    if tcp_send is None or getattr(tcp_send, "__name__", "") != "protocol_send":
        return None
    return partial(tcp_send, TransportClosed())


class _Socket:
    """One accepted WebSocket: its clientId, outbox (drained by a writer task) and drop trigger."""

    _ids = itertools.count(1)

    def __init__(self, sid: str, abrupt_close: Callable[[], Awaitable[None]] | None) -> None:
        self.id = next(self._ids)
        self.sid = sid
        self.abrupt_close = abrupt_close
        self._outbox_send, self.outbox = trio.open_memory_channel[str | bytes](OUTBOX_MAX_FRAMES)
        self.writer_scope = trio.CancelScope()  # cancelled to drop the connection
        self.dropped = False
        self.frames_lost = 0

    def __repr__(self) -> str:
        return f"<socket {self.id} clientId={self.sid!r}>"

    def push(self, frame: str | bytes) -> None:
        try:
            self._outbox_send.send_nowait(frame)
        except trio.WouldBlock:
            self.frames_lost += 1
            if self.frames_lost == 1:
                log.warning(
                    "%r: outbox full (%d frames), the client does not read: dropping frames", self, OUTBOX_MAX_FRAMES
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("%r: closed, frame dropped", self)

    def request_drop(self) -> None:
        self.dropped = True
        self.writer_scope.cancel()

    def close(self) -> None:
        self._outbox_send.close()
        self.outbox.close()


def _text_frame(event: str, data: Any) -> str:
    return json.dumps({"type": event, "data": data})


def _preview_frame(png: bytes) -> bytes:
    return struct.pack(">II", BINARY_PREVIEW_IMAGE, IMAGE_FORMAT_PNG) + png


def _preview_with_metadata_frame(png: bytes, prompt_id: str, node_id: str) -> bytes:
    metadata = json.dumps({
        "node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id, "parent_node_id": None,
        "real_node_id": node_id, "image_type": "image/png",
    }).encode()  # fmt: skip
    return struct.pack(">II", BINARY_PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + png


def _text_binary_frame(node_id: str, text: str) -> bytes:
    node = node_id.encode()
    return struct.pack(">II", BINARY_TEXT, len(node)) + node + text.encode()


async def _reject_websocket(send: AsgiSend, status: int) -> None:
    await send({"type": "websocket.http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "websocket.http.response.body", "body": b""})


class WebSocketEndpoint:
    """ComfyUI's /ws: one socket per clientId (a newer one replaces the older), feature flags."""

    def __init__(self, sim: FakeComfyUI) -> None:
        self.sim = sim

    async def handle(self, scope: dict[str, Any], receive: AsgiReceive, send: AsgiSend) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if _origin_forbidden(headers.get("host"), headers.get("origin")):  # ComfyUI's middleware comes first
            log.warning("WebSocket with Origin %r on Host %r: 403", headers.get("origin"), headers.get("host"))
            await _reject_websocket(send, 403)
            return
        if self.sim.refuse_websockets:
            await _reject_websocket(send, 503)
            return
        query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"))
        sid = query.get("clientId", [""])[0] or uuid.uuid4().hex
        await send({"type": "websocket.accept"})
        conn = _Socket(sid, _abrupt_closer(send))
        # ComfyUI keeps one socket per clientId: a newer one replaces the older, which is neither closed nor
        # sent anything any more.
        self.sim._sockets[sid] = conn
        self.sim._feature_flags[sid] = {}
        self.sim._connections.add(conn)
        log.debug("%r connected", conn)
        try:
            conn.push(_text_frame("status", {"status": self.sim._queue_info(), "sid": sid}))
            if self.sim._current_client_id == sid and self.sim._last_node_id is not None:
                conn.push(_text_frame("executing", {"node": self.sim._last_node_id}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._websocket_writer, conn, send)
                await self._websocket_reader(conn, receive)
                nursery.cancel_scope.cancel()
        finally:
            # The trap, faithfully: this removes whatever socket is registered under sid now, which may be a
            # newer one with the same clientId; that one then silently receives nothing.
            self.sim._sockets.pop(sid, None)
            self.sim._feature_flags.pop(sid, None)
            self.sim._connections.discard(conn)
            conn.close()
            log.debug("%r closed", conn)

    async def _websocket_reader(self, conn: _Socket, receive: AsgiReceive) -> None:
        """Until the client goes. Only a first JSON message of type feature_flags is understood."""
        first_message = True
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if message["type"] != "websocket.receive" or text is None:
                continue
            try:
                data = json.loads(text)
            except ValueError:
                log.warning("invalid JSON received from client %s: %r", conn.sid, text[:200])
                continue
            if not isinstance(data, dict):
                log.warning("unexpected WebSocket message from client %s: %r", conn.sid, text[:200])
                continue  # ComfyUI fails on data.get(); its first-message flag stays set
            if first_message and data.get("type") == "feature_flags":
                flags = data.get("data", {})
                # Keyed by clientId, as in ComfyUI: the flags (and the reply) go to the registered socket.
                if conn.sid in self.sim._feature_flags and isinstance(flags, dict):
                    self.sim._feature_flags[conn.sid] = flags
                self.sim._send_json("feature_flags", dict(SERVER_FEATURES), conn.sid)
            first_message = False

    async def _websocket_writer(self, conn: _Socket, send: AsgiSend) -> None:
        """Send the outbox in order. A drop is done from this task too, so it never cuts a frame in half."""
        with conn.writer_scope:
            async for frame in conn.outbox:
                if isinstance(frame, str):
                    await send({"type": "websocket.send", "text": frame})
                else:
                    await send({"type": "websocket.send", "bytes": frame})
        if not conn.dropped:
            return
        log.info("%r: dropping the connection", conn)
        if conn.abrupt_close is not None:
            await conn.abrupt_close()
        else:
            log.warning("%r: cannot cut the TCP connection with this hypercorn; closing with 1011", conn)
            await send({"type": "websocket.close", "code": 1011})
        await trio.sleep_forever()  # until the reader sees the disconnect and ends the connection
