"""One accepted WebSocket (its outbox, drained by a writer task, and its drop trigger) and ComfyUI's frames."""

from __future__ import annotations

import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.events import Closed as TransportClosed

from ._constants import (
    BINARY_PREVIEW_IMAGE,
    BINARY_PREVIEW_IMAGE_WITH_METADATA,
    BINARY_TEXT,
    IMAGE_FORMAT_PNG,
    OUTBOX_MAX_FRAMES,
)

log = logging.getLogger("fake_comfyui")

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


def _ws_frame(frame: str | bytes) -> bytes:
    """One unfragmented, unmasked server frame (RFC 6455 5.2) without extensions: what wsproto's server connection
    encodes for ``TextMessage``/``BytesMessage`` when no extension is enabled, byte for byte."""
    if isinstance(frame, str):
        payload, head = frame.encode(), 0x81
    else:
        payload, head = bytes(frame), 0x82
    length = len(payload)
    if length <= 125:
        return bytes((head, length)) + payload
    if length <= 0xFFFF:
        return bytes((head, 126)) + length.to_bytes(2, "big") + payload
    return bytes((head, 127)) + length.to_bytes(8, "big") + payload


def _batch_sender(asgi_send: AsgiSend) -> Callable[[list[str | bytes]], Awaitable[bool]] | None:
    """A coroutine function that sends several frames in one write to the TCP stream, or None.

    ASGI sends one frame per ``websocket.send``, each its own write and several trips through the event loop; a
    real ComfyUI at full speed (its sampler runs in a thread) hands the socket several frames at once. With
    hypercorn 0.18 (the layout ``_abrupt_closer`` relies on) the frames are encoded for the stream's own wsproto
    connection (by ``_ws_frame`` when that connection has no extension enabled, as wsproto would, else by wsproto)
    and written as one ``Data`` event. The function returns False (nothing sent) when the socket is not open any
    more; the caller then sends frame by frame through ASGI, which knows what to do.
    """
    ws_stream = getattr(asgi_send, "__self__", None)
    if not all(hasattr(ws_stream, name) for name in ("connection", "send", "stream_id", "closed", "state")):
        return None
    try:
        from hypercorn.events import RawData  # noqa: F401 - only checks the layout
        from hypercorn.protocol.events import Data
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
        from wsproto.connection import ConnectionState
        from wsproto.events import BytesMessage, TextMessage
    except ImportError:
        return None

    def plain(connection: Any) -> bool:
        """No extension enabled (permessage-deflate is offered by hypercorn, used only if the client asks)."""
        proto = getattr(connection, "_proto", None)
        extensions = getattr(proto, "extensions", None)
        return (
            isinstance(extensions, list)
            and not any(extension.enabled() for extension in extensions)
            and connection.state == ConnectionState.OPEN
            and getattr(proto, "_outbound_opcode", None) is None
        )

    async def send_batch(frames: list[str | bytes]) -> bool:
        stream: Any = ws_stream
        if stream.closed or stream.state != ASGIWebsocketState.CONNECTED:
            return False
        connection = stream.connection
        if plain(connection):
            data = b"".join(map(_ws_frame, frames))
        else:
            data = b"".join(
                connection.send(TextMessage(data=f) if isinstance(f, str) else BytesMessage(data=f)) for f in frames
            )
        await stream.send(Data(stream_id=stream.stream_id, data=data))
        return True

    return send_batch


class _Socket:
    """One accepted WebSocket: its clientId, outbox (drained by a writer task) and drop trigger."""

    _ids = itertools.count(1)

    def __init__(
        self,
        sid: str,
        abrupt_close: Callable[[], Awaitable[None]] | None,
        send_batch: Callable[[list[str | bytes]], Awaitable[bool]] | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.sid = sid
        self.abrupt_close = abrupt_close
        self.send_batch = send_batch
        # an item is one frame, or the frames of a burst of sampler steps (one channel operation for all of them)
        self._outbox_send, self.outbox = trio.open_memory_channel[str | bytes | tuple[str | bytes, ...]](
            OUTBOX_MAX_FRAMES
        )
        self.writer_scope = trio.CancelScope()  # cancelled to drop the connection
        self.dropped = False
        self.frames_lost = 0

    def __repr__(self) -> str:
        return f"<socket {self.id} clientId={self.sid!r}>"

    def push(self, frame: str | bytes | tuple[str | bytes, ...]) -> None:
        """One frame, or a tuple of frames that stay together (lost together when the outbox is full)."""
        try:
            self._outbox_send.send_nowait(frame)
        except trio.WouldBlock:
            self.frames_lost += len(frame) if isinstance(frame, tuple) else 1
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
