"""SockJS at ``/ws`` on trio/Quart: routes, sessions, and the transports the STOMP endpoint runs over.

Each SockJS session carries exactly one STOMP connection, run by the same ``StompEndpoint.run`` as a plain
WebSocket, over a ``StompTransport``:

* ``/ws/{server}/{session}/websocket``: the session lives as long as that WebSocket (``_SockJSWebSocket``).
* ``xhr`` / ``xhr_streaming`` / ``eventsource`` + ``xhr_send``: the session outlives the HTTP requests
  (``_HttpSession``). Its STOMP connection runs in the app's nursery; receiving requests take frames from the
  sans-IO ``SessionState``; a session with no receiving request for ``disconnect_delay`` seconds is cancelled
  (the STOMP endpoint then cleans up as for a dropped WebSocket).

Memory per HTTP session is bounded: outbound messages wait in ``SessionState`` up to ``max_pending`` bytes, after
which ``send`` blocks and the STOMP endpoint's own slow-consumer rules apply (its outbox overflows or gets
overdue, it sends ERROR, and a writer still stuck after CLOSE_GRACE ``abort``s the session); inbound batches wait
in a channel of ``INBOX`` entries, each at most one request body. A client that stops polling is gone after
``disconnect_delay``.

CORS: SockJS's XHRs carry credentials, so the allowed ``Origin`` is echoed with
``Access-Control-Allow-Credentials: true`` (a wildcard would be refused by the browser).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import trio
from quart import Response, request, websocket

from .._transport import TransportClosed, transport_closer
from . import _protocol as p
from ._protocol import SockJSConfig

log = logging.getLogger(__name__)

INBOX = 16  # client->server batches (xhr_send bodies) waiting per session before xhr_send waits
SEND_WAIT = 10.0  # seconds an xhr_send waits for room before it is answered 503
_ids = itertools.count(1)


class _HttpSession:
    """One HTTP-transport session: the ``StompTransport`` its STOMP connection runs over, and its state."""

    def __init__(self, key: str, cfg: SockJSConfig, transport: str) -> None:
        self.key = key
        self.cfg = cfg
        self.name = f"sockjs-{transport}"
        self.state = p.SessionState(
            now=trio.current_time(), heartbeat=cfg.heartbeat, disconnect_delay=cfg.disconnect_delay
        )
        self.inbox_send, self.inbox = trio.open_memory_channel[str](INBOX)
        self.changed = trio.Event()
        self.scope = trio.CancelScope()

    @property
    def abort(self) -> Callable[[], Awaitable[None]]:
        # a property, not an attribute holding ``self._abort``: that bound method would hold the session in a
        # reference cycle (kept whole, with its pending messages, until a full collection;
        # tests/test_closed_sessions_gc.py)
        return self._abort

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_change(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self.changed.wait()

    # -- StompTransport

    async def receive(self) -> str:
        try:
            return await self.inbox.receive()
        except trio.EndOfChannel:
            raise TransportClosed("SockJS session closed") from None

    async def send(self, text: str) -> None:
        while self.state.pending_bytes >= self.cfg.max_pending and self.state.state is not p.State.CLOSED:
            await self.wait_change(float("inf"))  # a receiving request takes the pending messages
        self.state.push(text)
        self.wake()

    async def close(self, code: int, reason: str) -> None:
        self.state.close(code, reason)
        self.wake()

    async def _abort(self) -> None:
        self.state.close(1008, "slow consumer", discard=True)  # what it could not take is not kept for it
        self.scope.cancel()
        self.wake()


class _SockJSWebSocket:
    """The SockJS ``websocket`` transport: SockJS frames inside one WebSocket, which is the session."""

    name = "sockjs-websocket"

    def __init__(self, ws: Any, heartbeat: float) -> None:
        self._ws = ws
        self._lock = trio.Lock()  # the STOMP writer and the heart-beat task both send
        self._heartbeat = heartbeat
        self._last_write = trio.current_time()
        self.abort = transport_closer(ws)

    async def _write(self, frame: str) -> None:
        async with self._lock:
            await self._ws.send(frame)
            self._last_write = trio.current_time()

    async def receive(self) -> str:
        while True:
            raw = await self._ws.receive()
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            if not text:
                continue  # empty WebSocket messages are ignored (sockjs-protocol test_empty_frame)
            try:
                messages = p.decode_payload(text)
            except p.PayloadError as exc:
                raise TransportClosed(f"SockJS message is not a JSON array of strings: {exc}") from None
            if messages:
                return "".join(messages)

    async def send(self, text: str) -> None:
        await self._write(p.message_frame([text]))

    async def close(self, code: int, reason: str) -> None:
        await self._write(p.close_frame(code, reason))
        await self._ws.close(code, reason)

    async def heartbeats(self) -> None:
        while True:
            await trio.sleep_until(self._last_write + self._heartbeat)
            if trio.current_time() >= self._last_write + self._heartbeat:
                await self._write(p.HEARTBEAT_FRAME)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _raise_alone(box: list[BaseException]) -> NoReturn:
    """Raise the one exception in ``box`` (a ``Cancelled``) so that no frame on its way keeps it.

    When the client of a SockJS WebSocket leaves, Quart cancels the handler, and the handler's nurseries (ours and
    the endpoint's reader) raise the ``Cancelled`` in an exception group. quart-trio passes a bare ``Cancelled`` on
    but hands a group to its error handler, whose frames then keep the group, and the group those frames: a
    reference cycle holding the whole closed session (our ``Conn`` with it). A cycle is freed only by the cycle
    collector, and a session frozen by ``web._gc`` not even by that, until a thaw: a full collection, ≈ 1.7 s of
    stall at 10,000 connections. So the handler raises the group's ``Cancelled`` alone, and from outside its
    ``except`` block (inside it, the group would become the ``Cancelled``'s ``__context__``: a cycle again). The
    caller's frame holds only the emptied ``box``, and this frame lets go of ``exc`` as it leaves."""
    exc = box.pop()
    try:
        raise exc
    finally:
        del exc


class SockJSService:
    """The SockJS routes at ``/ws`` and the live HTTP sessions (owned here; only the trio thread touches them)."""

    def __init__(
        self,
        endpoint: Any,
        cfg: SockJSConfig,
        origin_allowed: Callable[[str | None], bool],
        nursery: Callable[[], trio.Nursery],
    ) -> None:
        self.endpoint = endpoint
        self.cfg = cfg
        self.origin_allowed = origin_allowed
        self.nursery = nursery  # the app's nursery (quart-trio): HTTP sessions outlive the request that opened them
        self.sessions: dict[str, _HttpSession] = {}

    # -- HTTP helpers

    def _response(
        self, body: str | bytes | AsyncIterator[bytes], status: int = 200, ctype: str = "text/plain;charset=UTF-8"
    ) -> Response:
        resp = Response(body, status=status, content_type=ctype)
        resp.headers["Cache-Control"] = p.NO_CACHE
        return self._cors(resp)

    def _cors(self, resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin:  # credentials are sent: the origin is echoed, never "*"
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Credentials"] = "true"
            resp.headers["Vary"] = "Origin"
        else:
            resp.headers["Access-Control-Allow-Origin"] = "*"
        return resp

    def _refused_origin(self) -> Response | None:
        origin = request.headers.get("Origin")
        if self.origin_allowed(origin):
            return None
        log.warning(
            "sockjs: refused %s %s from origin %r (not in --allowed-origins)", request.method, request.path, origin
        )
        return Response(
            json.dumps({"error": "forbidden", "detail": f"origin {origin!r} is not allowed"}),
            status=403,
            content_type="application/json",
        )

    def _error(self, status: int, error: str, detail: str) -> Response:
        return self._cors(
            Response(json.dumps({"error": error, "detail": detail}), status=status, content_type="application/json")
        )

    async def options(self, methods: str) -> Response:
        if (refused := self._refused_origin()) is not None:
            return refused
        resp = Response("", status=204)
        year = 31_536_000  # seconds: preflights of SockJS URLs are cacheable for a year (sockjs-protocol)
        resp.headers["Cache-Control"] = f"public, max-age={year}"
        resp.headers["Expires"] = "Thu, 31 Dec 2037 23:55:55 GMT"
        resp.headers["Access-Control-Max-Age"] = str(year)
        resp.headers["Access-Control-Allow-Methods"] = methods
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            resp.headers["Access-Control-Allow-Headers"] = asked
        return self._cors(resp)

    # -- routes

    async def greeting(self) -> Response:
        return self._response("Welcome to SockJS!\n")

    async def info(self) -> Response:
        if (refused := self._refused_origin()) is not None:
            return refused
        return self._response(json.dumps(p.info(secrets.randbits(32))), ctype="application/json;charset=UTF-8")

    async def http_transport(self, server: str, session: str, transport: str) -> Response:
        if (refused := self._refused_origin()) is not None:
            return refused
        if not (p.valid_session_part(server) and p.valid_session_part(session)):
            return self._error(404, "not_found", "bad SockJS session path")
        if transport == "xhr_send":
            return await self._xhr_send(session)
        if transport == "websocket":  # a plain GET/POST on the WebSocket URL (sockjs-protocol WebsocketHttpErrors)
            if request.method != "GET":
                resp = self._error(405, "method_not_allowed", "the websocket transport takes GET with Upgrade")
                resp.headers["Allow"] = "GET"
                return resp
            return self._error(400, "bad_request", 'Can "Upgrade" only to "WebSocket".')
        if transport not in ("xhr", "xhr_streaming", "eventsource"):
            return self._error(404, "not_found", f"unknown SockJS transport {transport!r}")
        if (request.method == "GET") != (transport == "eventsource"):
            resp = self._error(
                405, "method_not_allowed", f"{transport} takes {'GET' if transport == 'eventsource' else 'POST'}"
            )
            resp.headers["Allow"] = "GET" if transport == "eventsource" else "POST"
            return resp
        sess = self.sessions.get(session)
        if sess is None:
            if len(self.sessions) >= self.cfg.max_sessions:
                return self._error(503, "too_many_sessions", f"at most {self.cfg.max_sessions} SockJS sessions")
            sess = self.open_session(session, transport)
        if transport == "xhr":
            frame = await self.poll(sess)
            return self._response(p.frame_for("xhr", frame), ctype="application/javascript;charset=UTF-8")
        resp = self._response(
            self._stream(sess, transport),
            ctype="text/event-stream;charset=UTF-8"
            if transport == "eventsource"
            else "application/javascript;charset=UTF-8",
        )
        resp.timeout = None  # a streaming response lasts as long as the session wants (Quart's default cuts it)
        return resp

    async def websocket_transport(self, server: str, session: str) -> Any:
        origin = websocket.headers.get("Origin")
        if not self.origin_allowed(origin):
            log.warning("sockjs: refused WebSocket from origin %r (not in --allowed-origins)", origin)
            return "origin not allowed", 403
        if not (p.valid_session_part(server) and p.valid_session_part(session)):
            return "bad SockJS session path", 404
        await websocket.accept()
        transport = _SockJSWebSocket(websocket, self.cfg.heartbeat)
        await transport._write(p.OPEN_FRAME)
        box: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.heartbeats)
                await self.endpoint.run(transport)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # Quart cancels the handler when the client leaves: see _raise_alone
            cancelled, rest = group.split(trio.Cancelled)
            if cancelled is None or rest is not None:
                raise
            box.append(_first_leaf(cancelled))
            del cancelled
        if box:
            _raise_alone(box)
        return None

    # -- HTTP sessions

    def open_session(self, key: str, transport: str) -> _HttpSession:
        sess = _HttpSession(key, self.cfg, transport)
        self.sessions[key] = sess
        self.nursery().start_soon(self._run_session, sess)
        log.debug("sockjs: session %s opened by %s", key, transport)
        return sess

    async def _run_session(self, sess: _HttpSession) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stomp, sess)
                while not sess.state.expired(trio.current_time()):
                    await sess.wait_change(sess.state.expires_at())
                nursery.cancel_scope.cancel()  # nobody has been receiving for disconnect_delay: the client is gone
        finally:
            if self.sessions.get(sess.key) is sess:
                del self.sessions[sess.key]
            sess.inbox_send.close()
            log.debug("sockjs: session %s gone (%r)", sess.key, sess.state)

    async def _stomp(self, sess: _HttpSession) -> None:
        with sess.scope:
            await self.endpoint.run(sess)
        sess.state.close(1000, "Normal closure")  # no-op after the endpoint's own close
        sess.wake()

    async def poll(self, sess: _HttpSession) -> str:
        now = trio.current_time()
        attached = sess.state.attach(now)
        if isinstance(attached, p.Refused):
            return attached.frame
        sess.wake()
        try:
            if attached.first is not None:
                return attached.first
            while (frame := sess.state.take(trio.current_time())) is None:
                await sess.wait_change(sess.state.heartbeat_at())
            return frame
        finally:
            sess.state.detach(trio.current_time())
            sess.wake()

    async def _stream(self, sess: _HttpSession, transport: str) -> AsyncIterator[bytes]:
        yield (p.EVENTSOURCE_PRELUDE if transport == "eventsource" else p.STREAMING_PRELUDE).encode()
        attached = sess.state.attach(trio.current_time())
        if isinstance(attached, p.Refused):
            yield p.frame_for(transport, attached.frame).encode()
            return
        sess.wake()
        try:
            if attached.first is not None:
                yield p.frame_for(transport, attached.first).encode()
            sent = 0
            while True:
                frame = sess.state.take(trio.current_time())
                if frame is None:
                    await sess.wait_change(sess.state.heartbeat_at())
                    continue
                data = p.frame_for(transport, frame).encode()
                yield data
                sent += len(data)
                if frame.startswith("c") or sent >= self.cfg.stream_limit:
                    return  # closed; or enough for one response: the client opens the next one
        finally:
            sess.state.detach(trio.current_time())
            sess.wake()

    async def _xhr_send(self, session: str) -> Response:
        sess = self.sessions.get(session)
        if sess is None or sess.state.state is p.State.CLOSED:
            return self._error(404, "not_found", "no such SockJS session")
        body = await request.get_data(as_text=False)
        try:
            messages = p.decode_payload(body.decode("utf-8") if isinstance(body, bytes) else body)
        except (UnicodeDecodeError, p.PayloadError) as exc:
            return self._response(str(exc) if isinstance(exc, p.PayloadError) else "Broken JSON encoding.", 500)
        if messages:
            with trio.move_on_after(SEND_WAIT):
                try:
                    await sess.inbox_send.send("".join(messages))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return self._error(404, "not_found", "the SockJS session has closed")
                return self._response(b"", 204)
            return self._error(503, "busy", "the session is not reading its messages; try again")
        return self._response(b"", 204)


def install(app: Any, endpoint: Any, cfg: SockJSConfig, origin_allowed: Callable[[str | None], bool]) -> SockJSService:
    """Add the SockJS routes under ``/ws`` to ``app`` (the plain WebSocket route ``/ws`` stays the app's)."""
    svc = SockJSService(endpoint, cfg, origin_allowed, lambda: app.nursery)
    app.add_url_rule("/ws", "sockjs_greeting", svc.greeting, methods=["GET"])
    app.add_url_rule("/ws/", "sockjs_greeting_slash", svc.greeting, methods=["GET"])
    app.add_url_rule("/ws/info", "sockjs_info", svc.info, methods=["GET"], provide_automatic_options=False)

    async def info_options() -> Response:
        return await svc.options("OPTIONS, GET")

    async def transport_options(server: str, session: str, transport: str) -> Response:
        return await svc.options("OPTIONS, GET" if transport == "eventsource" else "OPTIONS, POST")

    app.add_url_rule("/ws/info", "sockjs_info_options", info_options, methods=["OPTIONS"])
    rule = "/ws/<server>/<session>/<transport>"
    app.add_url_rule(rule, "sockjs_http", svc.http_transport, methods=["GET", "POST"], provide_automatic_options=False)
    app.add_url_rule(rule, "sockjs_options", transport_options, methods=["OPTIONS"])
    app.add_websocket("/ws/<server>/<session>/websocket", "sockjs_websocket", svc.websocket_transport)
    return svc
