"""The STOMP-over-WebSocket endpoint at /ws: one reader, one writer and one timer task per connection.

The protocol itself is the sans-IO ``web.stomp.StompConnection``; this module is only the trio loop around it:
receive -> ``receive_data`` -> ``next_event`` -> dispatch, and a writer that drains the connection's
``Outbox`` and packs every frame waiting into one WebSocket message (STACK-NOTES §3.1: 30x+ on this stack).
Control frames (CONNECTED, RECEIPT, ERROR, heart-beats) go through the same outbox, so order is preserved.
A client disconnect arrives as ``trio.Cancelled`` (STACK-NOTES §2.5): cleanup lives in ``finally`` blocks.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from actors import registry
from actors._util import ActorGone, ask
from actors.gateway import Handles
from actors.sessions import (
    BROADCAST_DESTINATION,
    USER_DESTINATION,
    Attach,
    AttachBroadcast,
    Detach,
    DetachBroadcast,
    Outbox,
    Outgoing,
    Publish,
    SlowConsumer,
)

from .auth import Authenticator, AuthError, Principal, bearer, valid_id
from .config import WebConfig
from .stomp import HEARTBEAT, NEED_DATA, Frame, RemoteProtocolError, StompConnection, encode_frame, negotiate_heartbeat

log = logging.getLogger(__name__)

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
SERVER_NAME = "comfy-gateway/0.1"
CONNECT_TIMEOUT = 10.0  # seconds a new socket has to send CONNECT
RAW = "raw"  # Outgoing.type of an already-encoded control frame
_ids = itertools.count(1)


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


class _Close(Exception):
    """Stop this connection after flushing: ``code`` is the WebSocket close code."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class _Conn:
    id: int
    outbox: Outbox
    stomp: StompConnection
    principal: Principal | None = None
    client_id: str | None = None
    subs: dict[str, tuple[str, str]] = field(default_factory=dict)  # destination -> (subscription id, ack mode)
    last_rx: float = 0.0
    last_tx: float = 0.0
    send_every: float = 0.0  # seconds; 0 = no heart-beats
    expect_every: float = 0.0
    messages: int = 0
    close_after_flush: _Close | None = None

    def raw(self, data: bytes) -> None:
        self.outbox.put_nowait(Outgoing("", 0, data, RAW))


def pick_subprotocol(offered: list[str]) -> str | None:
    for proto in SUBPROTOCOLS:
        if proto in offered:
            return proto
    return None


class StompEndpoint:
    def __init__(
        self, handles: Handles, cfg: WebConfig, auth: Authenticator, shutdown: trio.Event,
        counter: ConnectionCounter, metrics: Any,
    ) -> None:
        self.h = handles
        self.cfg = cfg
        self.auth = auth
        self.shutdown = shutdown
        self.counter = counter
        self.metrics = metrics
        self.live: set[int] = set()

    async def serve(self, websocket: Any) -> Any:
        origin = websocket.headers.get("Origin")
        if not self.cfg.origin_allowed(origin):
            log.warning("ws: refused upgrade from origin %r (not in --allowed-origins)", origin)
            return "origin not allowed", 403
        offered = list(websocket.requested_subprotocols)
        proto = pick_subprotocol(offered)
        if offered and proto is None:
            log.warning("ws: no STOMP subprotocol in %r", offered)
            return "no supported STOMP subprotocol (v12.stomp, v11.stomp, v10.stomp)", 400
        await websocket.accept(subprotocol=proto)
        conn = _Conn(
            id=next(_ids),
            outbox=Outbox(max_bytes=self.cfg.outbox_bytes, max_delay=self.cfg.outbox_delay),
            stomp=StompConnection(max_frame_size=self.cfg.max_frame_size),
            last_rx=trio.current_time(),
        )
        self.live.add(conn.id)
        self.metrics.connections_opened()
        close = _Close(1000)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, websocket, conn)
                nursery.start_soon(self._timers, conn)
                close = await self._writer(websocket, conn)
                nursery.cancel_scope.cancel()
            with trio.move_on_after(1, shield=True):
                await websocket.close(close.code, close.reason)
        finally:
            self.live.discard(conn.id)
            self.metrics.connections_closed(conn.outbox)
            with trio.CancelScope(shield=True):
                await self._detach(conn)
        return None

    # -- tasks

    async def _writer(self, websocket: Any, conn: _Conn) -> _Close:
        """Drain the outbox, one WebSocket message per batch; returns how to close."""
        while True:
            try:
                batch = await conn.outbox.get_batch()
            except SlowConsumer as exc:
                log.warning("ws %d: %s", conn.id, exc)
                self.metrics.slow_consumer()
                err = conn.stomp.error("slow consumer", f"{exc}; reconnect and resubscribe with last-seq to resume")
                with trio.move_on_after(1):
                    await websocket.send(err.decode())
                return _Close(1008, "slow consumer")
            parts = []
            now = trio.current_time()
            for out in batch:
                if out.type == RAW:
                    parts.append(out.body)
                    continue
                sub = conn.subs.get(out.destination)
                if sub is None:
                    continue
                conn.messages += 1
                headers = [
                    ("destination", out.destination), ("subscription", sub[0]),
                    ("message-id", f"{conn.id}-{conn.messages}"), ("content-type", "application/json"),
                    ("seq", str(out.seq)),
                ]
                if sub[1] != "auto":
                    headers.append(("ack", f"{conn.id}-{conn.messages}"))
                parts.append(encode_frame("MESSAGE", headers, out.body))
                self.metrics.relayed(out.type, now - out.created)
            if parts:
                await websocket.send(b"".join(parts).decode("utf-8", "replace"))
                conn.last_tx = trio.current_time()
            if conn.close_after_flush is not None and not len(conn.outbox):
                return conn.close_after_flush

    async def _reader(self, websocket: Any, conn: _Conn) -> None:
        try:
            while conn.close_after_flush is None:
                data = await websocket.receive()
                conn.last_rx = trio.current_time()
                conn.stomp.receive_data(data.encode() if isinstance(data, str) else data)
                while conn.close_after_flush is None:
                    event = conn.stomp.next_event()
                    if event is NEED_DATA:
                        break
                    if event is HEARTBEAT:
                        continue
                    await self._handle(conn, event)
        except RemoteProtocolError as exc:
            log.info("ws %d: protocol error: %s", conn.id, exc)
            self._fail(conn, exc.error_frame, 1002)
        except _Close as close:  # DISCONNECT: the writer flushes the RECEIPT, then closes
            conn.close_after_flush = close
            conn.outbox.put_nowait(Outgoing("", 0, b"", RAW))  # wake the writer

    async def _timers(self, conn: _Conn) -> None:
        """Heart-beats out, heart-beat enforcement in, slow-consumer deadline, CONNECT deadline, shutdown."""
        tick = 0.5
        opened = trio.current_time()
        while True:
            with trio.move_on_after(tick):
                await self.shutdown.wait()
                self._error(conn, "server shutting down", "the gateway is restarting; reconnect", 1001)
                return
            now = trio.current_time()
            if conn.principal is None and now - opened > CONNECT_TIMEOUT:
                self._error(conn, "no CONNECT", f"send CONNECT within {CONNECT_TIMEOUT:.0f}s of opening", 1008)
                return
            if conn.outbox.overdue():
                conn.outbox.fail(f"slow consumer: frames waited more than {conn.outbox.max_delay:.0f}s")
            if conn.send_every and now - conn.last_tx >= conn.send_every:
                conn.last_tx = now
                conn.raw(b"\n")
            if conn.expect_every and now - conn.last_rx > 2 * conn.expect_every:
                log.info("ws %d: no heart-beat for %.1fs: closing", conn.id, now - conn.last_rx)
                self._error(conn, "heart-beat timeout", f"nothing received for {now - conn.last_rx:.1f}s", 1002)
                return
            if self.cfg.heartbeat_ms[0]:
                tick = min(0.5, self.cfg.heartbeat_ms[0] / 4000)

    # -- frames

    def _fail(self, conn: _Conn, frame: Frame, code: int) -> None:
        conn.raw(conn.stomp.send(frame) if frame.command == "ERROR" else encode_frame("ERROR", frame.headers, frame.body))
        conn.close_after_flush = _Close(code, frame.get("message", "") or "")
        conn.outbox.put_nowait(Outgoing("", 0, b"", RAW))

    def _error(self, conn: _Conn, message: str, detail: str, code: int, receipt: str | None = None) -> None:
        if conn.close_after_flush is None:
            conn.raw(conn.stomp.error(message, detail, receipt_id=receipt))
            conn.close_after_flush = _Close(code, message[:100])
            conn.outbox.put_nowait(Outgoing("", 0, b"", RAW))

    async def _handle(self, conn: _Conn, frame: Frame) -> None:
        receipt = frame.get("receipt")
        cmd = frame.command
        if cmd in ("CONNECT", "STOMP"):
            await self._connect(conn, frame)
            return
        if cmd == "SUBSCRIBE":
            await self._subscribe(conn, frame, receipt)
        elif cmd == "UNSUBSCRIBE":
            await self._unsubscribe(conn, frame.get("id") or frame.get("destination") or "")
        elif cmd == "SEND":
            await self._send(conn, frame, receipt)
        elif cmd == "DISCONNECT":
            if receipt is not None:
                conn.raw(conn.stomp.send(Frame("RECEIPT", (("receipt-id", receipt),))))
            raise _Close(1000, "disconnect")
        # ACK, NACK, BEGIN, COMMIT, ABORT: accepted (messages are auto-acknowledged)
        if receipt is not None and conn.close_after_flush is None:
            conn.raw(conn.stomp.send(Frame("RECEIPT", (("receipt-id", receipt),))))

    async def _connect(self, conn: _Conn, frame: Frame) -> None:
        token = bearer(frame.get("Authorization") or frame.get("authorization")) or frame.get("token") or frame.get("passcode")
        client_id = frame.get("clientId")
        try:
            who = self.auth.authenticate(token, client_id)
        except AuthError as exc:
            log.info("ws %d: CONNECT refused: %s", conn.id, exc)
            self._error(conn, "unauthorized", str(exc), 1008, frame.get("receipt"))
            return
        client_id = client_id or who.client_id or f"conn-{conn.id}"
        if not valid_id(client_id):
            self._error(conn, "bad clientId", "clientId must be a printable string without ':'", 1008)
            return
        if not self.counter.acquire(who.user_id):
            self._error(conn, "too many connections", f"at most {self.counter.limit} connections per user", 1008)
            return
        conn.principal, conn.client_id = who, client_id
        try:
            send_ms, expect_ms = negotiate_heartbeat(frame.get("heart-beat"), self.cfg.heartbeat_ms)
        except RemoteProtocolError as exc:
            self._fail(conn, exc.error_frame, 1002)
            return
        conn.send_every, conn.expect_every = send_ms / 1000, expect_ms / 1000
        conn.raw(conn.stomp.send(Frame("CONNECTED", (
            ("version", conn.stomp.version or "1.2"), ("heart-beat", f"{send_ms},{expect_ms}"),
            ("server", SERVER_NAME), ("session", f"{conn.id}"), ("user-name", who.user_id),
        ))))
        log.info("ws %d: %s/%s connected (STOMP %s)", conn.id, who.user_id, client_id, conn.stomp.version)

    async def _subscribe(self, conn: _Conn, frame: Frame, receipt: str | None) -> None:
        assert conn.principal is not None and conn.client_id is not None
        dest = frame.get("destination") or ""
        sub_id = frame.get("id") or dest
        ack = frame.get("ack") or "auto"
        if dest not in (USER_DESTINATION, BROADCAST_DESTINATION):
            self._error(conn, "unknown destination", f"cannot subscribe to {dest!r}; use {USER_DESTINATION} or "
                        f"{BROADCAST_DESTINATION}", 1008, receipt)
            return
        if dest not in conn.subs and len(conn.subs) >= self.cfg.max_subscriptions:
            self._error(conn, "too many subscriptions", f"at most {self.cfg.max_subscriptions}", 1008, receipt)
            return
        already = dest in conn.subs
        conn.subs[dest] = (sub_id, ack)
        if already:
            return
        if dest == USER_DESTINATION:
            last_seq = frame.get("last-seq")
            try:
                since = int(last_seq) if last_seq not in (None, "") else None
            except ValueError:
                self._error(conn, "bad last-seq", f"last-seq must be an integer, not {last_seq!r}", 1002, receipt)
                return
            await self.h.sessions.send(Attach(conn.principal.user_id, conn.client_id, conn.outbox, since))
        else:
            await self.h.sessions.send(AttachBroadcast(conn.outbox))

    async def _unsubscribe(self, conn: _Conn, sub_id: str) -> None:
        for dest, (sid, _) in list(conn.subs.items()):
            if sid == sub_id:
                del conn.subs[dest]
                await self._detach_dest(conn, dest)

    async def _detach_dest(self, conn: _Conn, dest: str) -> None:
        assert conn.principal is not None and conn.client_id is not None
        if dest == USER_DESTINATION:
            await self.h.sessions.send(Detach(conn.principal.user_id, conn.client_id, conn.outbox))
        else:
            await self.h.sessions.send(DetachBroadcast(conn.outbox))

    async def _detach(self, conn: _Conn) -> None:
        if conn.principal is None:
            return
        for dest in list(conn.subs):
            await self._detach_dest(conn, dest)
        conn.subs.clear()
        self.counter.release(conn.principal.user_id)

    async def _send(self, conn: _Conn, frame: Frame, receipt: str | None) -> None:
        assert conn.principal is not None and conn.client_id is not None
        dest = frame.get("destination")
        user, client = conn.principal.user_id, conn.client_id
        if dest not in ("/app/tasks", "/app/cancel"):
            self._error(conn, "unknown destination", f"cannot send to {dest!r}; use /app/tasks or /app/cancel",
                        1008, receipt)
            return
        try:
            body = json.loads(frame.body.decode("utf-8")) if frame.body else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            await self._reject(user, client, "bad_json", "the body must be a JSON object")
            return
        if dest == "/app/tasks":
            from .app import submit  # local import: app imports this module

            if body.get("clientId") not in (None, client):
                await self._reject(user, client, "forbidden", "clientId in the body does not match this connection")
                return
            result = await submit(self.h, self.cfg, user, client, body)
            if isinstance(result, registry.Refused):
                await self._reject(user, client, result.error, result.detail)
        else:
            task_id = body.get("taskId")
            if not isinstance(task_id, str):
                await self._reject(user, client, "bad_request", "body must be {\"taskId\": str}")
                return
            try:
                with trio.fail_after(10):
                    outcome = await ask(self.h.registry, lambda r: registry.Cancel(user, task_id, r), name="registry")
            except (trio.TooSlowError, ActorGone):
                outcome = "unavailable"
            if outcome in ("not_found", "finished", "unavailable"):
                await self._reject(user, client, outcome, f"cannot cancel task {task_id}: {outcome.replace('_', ' ')}",
                                   task_id)

    async def _reject(self, user: str, client: str, error: str, detail: str, task_id: str | None = None) -> None:
        body: dict[str, Any] = {"type": "rejected", "error": error, "detail": detail}
        if task_id is not None:
            body["taskId"] = task_id
        await self.h.sessions.send(Publish(user, client, body))
