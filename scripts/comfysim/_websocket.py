"""The WebSocket side: ComfyUI's /ws endpoint, one socket per clientId (a newer one replaces the older)."""

from __future__ import annotations

import json
import logging
import urllib.parse
import uuid
from typing import Any

import trio

from ._constants import SERVER_FEATURES, WRITE_BATCH_FRAMES
from ._net import _origin_forbidden
from ._socket import AsgiReceive, AsgiSend, _abrupt_closer, _batch_sender, _Socket, _text_frame
from ._state import SimState

log = logging.getLogger("fake_comfyui")

# --- WebSocket connections ----------------------------------------------------------------------------


async def _reject_websocket(send: AsgiSend, status: int) -> None:
    await send({"type": "websocket.http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "websocket.http.response.body", "body": b""})


class WebSocketEndpoint:
    """ComfyUI's /ws: one socket per clientId (a newer one replaces the older), feature flags."""

    def __init__(self, sim: SimState) -> None:
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
        conn = _Socket(sid, _abrupt_closer(send), _batch_sender(send))
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
            async for first in conn.outbox:
                frames: list[str | bytes] = []  # this item and whatever else is ready: one write for all of them
                item = first
                while True:
                    if isinstance(item, tuple):  # a burst of sampler steps
                        frames += item
                    else:
                        frames.append(item)
                    if len(frames) >= WRITE_BATCH_FRAMES:
                        break
                    try:
                        item = conn.outbox.receive_nowait()
                    except trio.WouldBlock:
                        break
                if len(frames) > 1 and conn.send_batch is not None and await conn.send_batch(frames):
                    continue
                for frame in frames:
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
