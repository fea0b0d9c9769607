"""The STOMP commands of the /ws endpoint: CONNECT, SUBSCRIBE, UNSUBSCRIBE and SEND (the /app routes), and the
ERROR/RECEIPT frames they answer with. ``web._ws.StompEndpoint`` adds the transport loops (reader, writer,
timers) on top of this class; the frames themselves are the sans-IO ``web.stomp.StompConnection``'s.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from actors import NoAnswer, ask_within, registry
from actors.gateway import Handles
from actors.sessions import (
    BROADCAST_DESTINATION,
    USER_DESTINATION,
    Attach,
    AttachBroadcast,
    Connect,
    Detach,
    DetachBroadcast,
    Publish,
)
from actors.validate import decode_json
from actors.wire import DomainError

from ._conn import END_MARKER as _END
from ._conn import Close as _Close
from ._conn import Conn as _Conn
from ._conn import ConnectionCounter
from ._gc import FreezePolicy
from ._submit import ASK_TIMEOUT, submit
from ._templates import TemplateLibrary
from ._timers import Timers
from .auth import Authenticator, AuthError, bearer, valid_id
from .config import WebConfig
from .errors import rejected
from .stomp import Frame, RemoteProtocolError, encode_frame, negotiate_heartbeat

log = logging.getLogger(__name__)

SERVER_NAME = "comfy-gateway/0.1"
DETACH_TIMEOUT = 2.0  # seconds the cleanup of a closed connection waits for the sessions hub
REPLAY_WINDOW = 60.0  # seconds over which --max-replays-per-minute counts a connection's replays


class StompCommands:
    """The state every connection shares (handles, config, limits, timers) and the STOMP commands."""

    def __init__(
        self,
        handles: Handles,
        cfg: WebConfig,
        auth: Authenticator,
        shutdown: trio.Event,
        counter: ConnectionCounter,
        metrics: Any,
        templates: TemplateLibrary,
        nursery: Callable[[], trio.Nursery],
    ) -> None:
        self.h = handles
        self.templates = templates
        self.cfg = cfg
        self.auth = auth
        self.shutdown = shutdown
        self.counter = counter
        self.metrics = metrics
        self.live: dict[int, _Conn] = {}  # by connection id
        self.timers = Timers()  # every connection's deadlines, served by one task in ``nursery``
        self.timers_nursery = nursery  # the app's nursery (quart-trio): the service outlives any connection
        self._timers_started = False
        self._now = trio.current_time  # the run's clock, once ``run`` has started the timers (web._ws)
        self.freezer = FreezePolicy()  # gc.freeze() after connection bursts, thawed once enough have closed

    def _condemned(self, conn: _Conn) -> None:
        """``conn`` will close: the watchdog starts counting CLOSE_GRACE now."""
        self.timers.arm(conn, trio.current_time())

    def _fail(self, conn: _Conn, frame: Frame, code: int) -> None:
        if conn.close_after_flush is None:
            conn.raw(
                conn.stomp.send(frame) if frame.command == "ERROR" else encode_frame("ERROR", frame.headers, frame.body)
            )
            conn.close_after_flush = _Close(code, frame.get("message", "") or "")
            conn.outbox.put_nowait(_END)
            self._condemned(conn)

    def _error(self, conn: _Conn, message: str, detail: str, code: int, receipt: str | None = None) -> None:
        if conn.close_after_flush is None:
            conn.raw(conn.stomp.error(message, detail, receipt_id=receipt))
            conn.close_after_flush = _Close(code, message[:100])
            conn.outbox.put_nowait(_END)
            self._condemned(conn)

    def _receipt(self, conn: _Conn, receipt: str | None) -> None:
        if receipt is not None and conn.close_after_flush is None:
            conn.raw(conn.stomp.send(Frame("RECEIPT", (("receipt-id", receipt),))))

    async def _connect(self, conn: _Conn, frame: Frame) -> None:
        token = (
            bearer(frame.get("Authorization") or frame.get("authorization"))
            or frame.get("token")
            or frame.get("passcode")
        )
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
            conn.session_held = await ask_within(
                self.h.sessions, lambda r: Connect(who.user_id, client_id, r), DETACH_TIMEOUT * 5, name="sessions"
            )
        except NoAnswer:
            self._error(conn, "unavailable", "the gateway is busy; reconnect later", 1013)
            return
        if not conn.session_held:
            self._error(
                conn,
                "too many sessions",
                f"every one of your {self.h.config.max_sessions_per_user} "
                "sessions has a live connection; close one or reuse a clientId",
                1008,
            )
            return
        try:
            send_ms, expect_ms = negotiate_heartbeat(frame.get("heart-beat"), self.cfg.heartbeat_ms)
        except RemoteProtocolError as exc:
            self._fail(conn, exc.error_frame, 1002)
            return
        conn.send_every, conn.expect_every = send_ms / 1000, expect_ms / 1000
        if conn.tap is not None:  # a /ws connection may rest between our heart-beats (web._transport.HeartbeatTap)
            conn.tap.lazy = self.cfg.lazy_heartbeats and conn.send_every > 0
        conn.last_tx = trio.current_time()  # CONNECTED is on its way: the first heart-beat is due one period on
        self.timers.arm(conn, conn.last_tx)  # recompute the deadlines now that heart-beats are agreed
        conn.raw(
            conn.stomp.send(
                Frame(
                    "CONNECTED",
                    (
                        ("version", conn.stomp.version or "1.2"),
                        ("heart-beat", f"{send_ms},{expect_ms}"),
                        ("server", SERVER_NAME),
                        ("session", f"{conn.id}"),
                        ("user-name", who.user_id),
                    ),
                )
            )
        )
        log.info(
            "ws %d: %s/%s connected (STOMP %s over %s)",
            conn.id,
            who.user_id,
            client_id,
            conn.stomp.version,
            conn.transport,
        )

    async def _subscribe(self, conn: _Conn, frame: Frame, receipt: str | None) -> None:
        assert conn.principal is not None and conn.client_id is not None
        dest = frame.get("destination") or ""
        sub_id = frame.get("id") or dest
        ack = frame.get("ack") or "auto"
        if dest not in (USER_DESTINATION, BROADCAST_DESTINATION):
            self._error(
                conn,
                "unknown destination",
                f"cannot subscribe to {dest!r}; use {USER_DESTINATION} or {BROADCAST_DESTINATION}",
                1008,
                receipt,
            )
            return
        if dest not in conn.subs and len(conn.subs) >= self.cfg.max_subscriptions:
            self._error(conn, "too many subscriptions", f"at most {self.cfg.max_subscriptions}", 1008, receipt)
            return
        if dest in conn.subs:
            conn.subs[dest] = (sub_id, ack)
            conn.prefixes.pop(dest, None)  # rebuilt for the new id / ack mode by the writer
            self._receipt(conn, receipt)
            return
        since = None
        if dest == USER_DESTINATION:
            last_seq = frame.get("last-seq")
            try:
                since = int(last_seq) if last_seq else None
            except ValueError:
                self._error(conn, "bad last-seq", f"last-seq must be an integer, not {last_seq!r}", 1002, receipt)
                return
            if since is not None and not self._replay_allowed(conn):
                self._error(
                    conn,
                    "too many replays",
                    f"at most {self.cfg.max_replays_per_minute} subscriptions with last-seq per connection per minute",
                    1008,
                    receipt,
                )
                return
        # in conn.subs before the hub can queue the replay (the writer routes by it); a send that raised did not
        # deliver, so it leaves no Detach owed (a Detach without its Attach would miscount the session's connections)
        conn.subs[dest] = (sub_id, ack)
        conn.prefixes.pop(dest, None)
        self._receipt(conn, receipt)  # the RECEIPT goes first: the hub queues the replay as soon as it takes the Attach
        try:
            if dest == USER_DESTINATION:
                await self.h.sessions.send(Attach(conn.principal.user_id, conn.client_id, conn.outbox, since))
            else:
                await self.h.sessions.send(AttachBroadcast(conn.outbox))
        except BaseException:
            del conn.subs[dest]
            conn.prefixes.pop(dest, None)
            raise

    def _replay_allowed(self, conn: _Conn) -> bool:
        now = trio.current_time()
        replays = conn.replays
        if replays is None:
            replays = conn.replays = deque()
        while replays and now - replays[0] >= REPLAY_WINDOW:
            replays.popleft()
        if len(replays) >= self.cfg.max_replays_per_minute:
            return False
        replays.append(now)
        return True

    async def _unsubscribe(self, conn: _Conn, sub_id: str) -> None:
        for dest, (sid, _) in list(conn.subs.items()):
            if sid == sub_id:
                await self._detach_dest(conn, dest)
                del conn.subs[dest]
                conn.prefixes.pop(dest, None)

    async def _detach_dest(self, conn: _Conn, dest: str) -> None:
        assert conn.principal is not None and conn.client_id is not None
        if dest == USER_DESTINATION:
            await self.h.sessions.send(Detach(conn.principal.user_id, conn.client_id, conn.outbox))
        else:
            await self.h.sessions.send(DetachBroadcast(conn.outbox))

    async def _send(self, conn: _Conn, frame: Frame, receipt: str | None) -> None:
        assert conn.principal is not None and conn.client_id is not None
        dest = frame.get("destination")
        user, client = conn.principal.user_id, conn.client_id
        if dest not in ("/app/tasks", "/app/cancel"):
            self._error(
                conn, "unknown destination", f"cannot send to {dest!r}; use /app/tasks or /app/cancel", 1008, receipt
            )
            return
        body, problem = decode_json(frame.body, self.cfg.limits) if frame.body else ({}, None)
        if problem is not None:
            await self._reject(user, client, problem.code, problem.detail)
            return
        if not isinstance(body, dict):
            await self._reject(user, client, "bad_json", "the body must be a JSON object")
            return
        if dest == "/app/tasks":
            if body.get("clientId") not in (None, client):
                await self._reject(user, client, "forbidden", "clientId in the body does not match this connection")
                return
            result = await submit(self.h, self.cfg, self.templates, conn.principal, client, body)
            if isinstance(result, registry.Refused):
                await self._reject(user, client, result.code, result.detail)
        else:
            task_id = body.get("taskId")
            if not isinstance(task_id, str):
                await self._reject(user, client, "bad_request", 'body must be {"taskId": str}')
                return
            try:
                outcome = await ask_within(
                    self.h.registry, lambda r: registry.Cancel(user, task_id, r), ASK_TIMEOUT, name="registry"
                )
            except NoAnswer:
                outcome = "unavailable"
            if outcome in ("not_found", "finished", "unavailable"):
                # a taskId that is not this user's is not echoed as a field: messages carry only the user's own ids
                await self._reject(
                    user,
                    client,
                    outcome,
                    f"cannot cancel task {task_id}: {outcome.replace('_', ' ')}",
                    None if outcome == "not_found" else task_id,
                )

    async def _reject(self, user: str, client: str, error: str, detail: str, task_id: str | None = None) -> None:
        await self.h.sessions.send(Publish(user, client, rejected(DomainError(error, detail), task_id).to_wire()))


__all__ = ["DETACH_TIMEOUT", "REPLAY_WINDOW", "SERVER_NAME", "StompCommands"]
