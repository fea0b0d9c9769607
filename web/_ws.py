"""The STOMP endpoint at /ws: a reader and a writer task per connection; every deadline in one shared heap.

A connection runs over a ``StompTransport`` (``web._transport``): a plain WebSocket (``serve``), or a SockJS
session (``web.sockjs``, which calls ``run``); the rules below are the same for both.

The protocol itself is the sans-IO ``web.stomp.StompConnection``; this module is only the trio loop around it:
receive -> ``receive_data`` -> ``next_event`` -> dispatch (to the commands of ``web._ws_commands``), and a
writer that drains the connection's ``Outbox`` and packs every frame waiting into one WebSocket message (STACK-NOTES §3.1: 30x+ on this stack).
Control frames (CONNECTED, RECEIPT, ERROR, heart-beats) go through the same outbox, so order is preserved.
A client disconnect arrives as ``trio.Cancelled`` (STACK-NOTES §2.5): cleanup lives in ``finally`` blocks.

Every way a connection ends (DISCONNECT, a protocol error, a heart-beat or CONNECT timeout, a slow consumer,
shutdown) goes the same path: an ERROR/RECEIPT is queued, the writer flushes it, the session is detached, and
the socket is closed with a code. A client that stopped reading can leave the writer stuck for ever inside
``websocket.send()`` (Hypercorn shields the socket write, STACK-NOTES §2.6), so the timers (``web._timers``:
one heap, one task for every connection, no periodic wake-up) are also a watchdog: once a connection is
condemned, the writer gets ``CLOSE_GRACE`` seconds to finish, after which the TCP connection is cut underneath it
(``_transport.transport_closer``).
"""

from __future__ import annotations

import itertools
import logging
import math
from functools import partial
from typing import Any

import trio

from actors.sessions import Disconnect

from ._conn import END, RAW, pick_subprotocol
from ._conn import END_MARKER as _END
from ._conn import Close as _Close
from ._conn import Conn as _Conn
from ._outbox import Outbox, SlowConsumer
from ._transport import HeartbeatTap, PumpInbox, StompTransport, TransportClosed, WebSocketTransport, pump_inbox
from ._ws_commands import DETACH_TIMEOUT, StompCommands
from .stomp import HEARTBEAT, NEED_DATA, Frame, RemoteProtocolError, StompConnection, encode_frame

log = logging.getLogger(__name__)

CLOSE_GRACE = 1.0  # seconds a condemned connection's writer has to flush and close before the socket is cut
HEARTBEAT_SLACK = 1.0  # seconds (at most a tenth of the period) a heart-beat may go early, to share a timer wake-up
_ids = itertools.count(1)


class StompEndpoint(StompCommands):
    """The endpoint: the commands of ``StompCommands`` over a reader and a writer task per connection."""

    def _announce_shutdown(self) -> None:
        for conn in list(self.live.values()):
            self._shutting_down(conn)

    def _shutting_down(self, conn: _Conn) -> None:
        self._error(conn, "server shutting down", "the gateway is restarting; reconnect", 1001)

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
        transport, inbox = WebSocketTransport(websocket), pump_inbox(websocket)
        tap = transport.tap_heartbeats(inbox) if inbox is not None else None  # before any message can come
        await websocket.accept(subprotocol=proto)
        await self.run(transport, inbox, tap)
        return None

    async def run(
        self, transport: StompTransport, inbox: PumpInbox | None = None, tap: HeartbeatTap | None = None
    ) -> None:
        """One STOMP connection over ``transport`` (a plain WebSocket, or a SockJS session), until it ends.
        With an ``inbox`` that can be claimed, quart's own message task hands each message to ``_pumped``: no reader
        task (and no nursery) of ours, and with a ``tap`` (``web._transport.HeartbeatTap``) the client's lone
        heart-beats are taken below Hypercorn (``_tapped``); else a reader task reads ``transport``."""
        if not self._timers_started:
            self._timers_started = True
            self._now = trio.lowlevel.current_clock().current_time  # trio.current_time(), one call instead of three
            self.timers_nursery().start_soon(self.timers.serve, self._fire, self.shutdown, self._announce_shutdown)
        now = trio.current_time()
        conn = _Conn(
            id=next(_ids),
            outbox=Outbox(max_bytes=self.cfg.outbox_bytes, max_delay=self.cfg.outbox_delay),
            stomp=StompConnection(max_frame_size=self.cfg.max_frame_size),
            last_rx=now,
            io=transport,
            transport=transport.name,
            opened=now,
        )
        conn.outbox.on_due = partial(self.timers.arm, conn)
        self.live[conn.id] = conn
        self.metrics.connections_opened()
        self.freezer.opened(self.live)  # a burst of connects is frozen out of full collections (web._gc)
        self.timers.arm(conn, now + self.cfg.connect_timeout)
        if self.shutdown.is_set():
            self._shutting_down(conn)
        try:
            if inbox is not None and inbox.claim(partial(self._pumped, conn)):
                if tap is not None:  # lone heart-beats are taken as they come off the socket
                    tap.hook = partial(self._tapped, conn)
                    conn.tap = tap  # it may rest (``tap.lazy``) once CONNECT has agreed our heart-beats
                await self._close(transport, conn, await self._writer(transport, conn))
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, transport, conn)
                    await self._close(transport, conn, await self._writer(transport, conn))
                    nursery.cancel_scope.cancel()
        finally:
            self.timers.disarm(conn)
            with trio.move_on_after(DETACH_TIMEOUT, shield=True) as scope:
                await self._stop_reading(conn)
                await self._release(conn)
            if scope.cancelled_caught:
                log.error("ws %d: the sessions hub did not take the Detach within %.0fs", conn.id, DETACH_TIMEOUT)
            del self.live[conn.id]  # last: a connection not in ``live`` is detached and its tasks are gone
            self.metrics.connections_closed(conn.outbox)
            if conn.outbox.failed is not None:
                self.metrics.slow_consumer()
            _unlink(conn, inbox)
            # shown free of cycles: tests/test_stomp_endpoint.py (/ws), tests/test_closed_sessions_gc.py (SockJS)
            self.freezer.closed(conn.id, conn, self.live)

    async def _close(self, transport: StompTransport, conn: _Conn, close: _Close) -> None:
        # detach first: a client that reconnects as soon as it sees the close finds its slot free
        await self._stop_reading(conn)
        await self._release(conn)
        try:
            await transport.close(close.code, close.reason)  # the timers' watchdog still watches this send
        except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # the watchdog cut the TCP connection while the close frame was on its way (CHAOS.md: a poisoner's or
            # flooder's connection): it is closed either way
            log.info("ws %d: close frame not sent (%s: %s)", conn.id, type(exc).__name__, exc)

    async def _stop_reading(self, conn: _Conn) -> None:
        """Read nothing more (pumped: later messages are dropped); a frame being handled by the pump is cancelled
        and waited for, so nothing attaches after ``_release`` (a reader task is its nursery's to cancel)."""
        conn.reading = False
        scope = conn.feeding
        if scope is not None:
            scope.cancel()
            conn.fed = trio.Event()
            await conn.fed.wait()

    # -- tasks

    async def _writer(self, transport: StompTransport, conn: _Conn) -> _Close:
        """Drain the outbox, one WebSocket message per batch; returns how to close."""
        while True:
            try:  # the batch lives in _send_batch's frame only: an idle writer holds no frames of the last one
                close = await self._send_batch(transport, conn, await conn.outbox.get_batch())
            except SlowConsumer as exc:
                log.warning("ws %d: %s", conn.id, exc)
                # encode_frame, not stomp.error(): an ERROR may already have been sent on this connection
                err = encode_frame(
                    "ERROR",
                    (("message", "slow consumer"), ("content-type", "text/plain")),
                    f"{exc}; reconnect and resubscribe with last-seq to resume".encode(),
                )
                await transport.send(err.decode())  # bounded by the timers' watchdog (CLOSE_GRACE)
                return _Close(1008, "slow consumer")
            if close is not None:
                return close

    async def _send_batch(self, transport: StompTransport, conn: _Conn, batch: list[Any]) -> _Close | None:
        """One batch as one WebSocket message; returns how to close once the batch ends the connection."""
        parts: list[bytes] = []
        now = trio.current_time()
        relayed = self.metrics.relayed
        for out in batch:
            if out.type == END:  # what was queued after the last frame is not sent
                if parts:
                    await transport.send(b"".join(parts).decode("utf-8", "replace"))
                assert conn.close_after_flush is not None
                return conn.close_after_flush
            if out.type == RAW:
                parts.append(out.body)
                continue
            prefix = conn.prefixes.get(out.destination)
            if prefix is None:
                prefix = self._prefix(conn, out.destination)
                if prefix is None:  # not subscribed (any more)
                    continue
            conn.messages += 1
            mid = b"%d-%d" % (conn.id, conn.messages)
            ack = b"ack:" + mid + b"\n" if conn.acks.get(out.destination) else b""
            parts.append(
                b"%smessage-id:%s\nseq:%d\n%scontent-length:%d\n\n%s\0"
                % (prefix, mid, out.seq, ack, len(out.body), out.body)
            )
            relayed(out.type, now - out.created)
        if parts:
            await transport.send(b"".join(parts).decode("utf-8", "replace"))
            conn.last_tx = trio.current_time()
        return None

    def _prefix(self, conn: _Conn, destination: str) -> bytes | None:
        """The MESSAGE header lines fixed for a subscription (built once per SUBSCRIBE), or None if not subscribed.
        Each frame adds message-id, seq, ack (client ack modes) and content-length."""
        sub = conn.subs.get(destination)
        if sub is None:
            return None
        frame = encode_frame(
            "MESSAGE",
            (("destination", destination), ("subscription", sub[0]), ("content-type", "application/json")),
            escape=conn.stomp.version != "1.0",
            content_length=False,
        )
        prefix = conn.prefixes[destination] = frame[:-2]  # without the blank line and the NUL
        conn.acks[destination] = sub[1] != "auto"
        return prefix

    async def _reader(self, transport: StompTransport, conn: _Conn) -> None:
        try:
            while conn.close_after_flush is None:  # what one message brought lives in _feed's frame only
                await self._feed(conn, await transport.receive())
        except (RemoteProtocolError, TransportClosed, _Close) as exc:
            self._stopped(conn, exc)

    async def _pumped(self, conn: _Conn, data: str | bytes) -> None:
        """One message, in quart's message task (see ``run``). A heart-beat costs a time stamp; a frame is handled
        inside a cancel scope that ``_stop_reading`` can cancel (and wait for)."""
        if not conn.reading or conn.close_after_flush is not None:  # closing: not read any more
            return
        if self._heard(conn, data):
            return
        with trio.CancelScope() as conn.feeding:
            try:
                await self._frames(conn, data)
            except (RemoteProtocolError, TransportClosed, _Close) as exc:
                self._stopped(conn, exc)
            finally:
                conn.feeding = None
                if conn.fed is not None:
                    conn.fed.set()

    def _stopped(self, conn: _Conn, exc: Exception) -> None:
        """What ends the reading: a protocol error, a broken transport, or DISCONNECT."""
        if isinstance(exc, RemoteProtocolError):
            log.info("ws %d: protocol error: %s", conn.id, exc)
            self._fail(conn, exc.error_frame, 1002)
        elif isinstance(exc, TransportClosed):
            log.info("ws %d (%s): %s", conn.id, conn.transport, exc)
            self._error(conn, "transport error", str(exc), 1002)
        elif isinstance(exc, _Close) and conn.close_after_flush is None:  # DISCONNECT: RECEIPT, then close
            conn.close_after_flush = exc.with_traceback(None)  # kept: its traceback's frames would hold conn
            conn.outbox.put_nowait(_END)
            self._condemned(conn)

    def _tapped(self, conn: _Conn, text: str) -> bool:
        """A lone heart-beat read below Hypercorn (``web._transport.HeartbeatTap``): taken here as ``_pumped`` would
        take it, or False (closing, not between frames) to send it the usual way."""
        return conn.reading and conn.close_after_flush is None and self._heard(conn, text)

    def _heard(self, conn: _Conn, data: str | bytes) -> bool:
        """The client spoke; True when ``data`` is a heart-beat alone (taken: nothing to parse)."""
        conn.last_rx = self._now()
        return conn.stomp.take_heartbeat(data)

    async def _feed(self, conn: _Conn, data: str | bytes) -> None:
        """One message from the client (the reader task's)."""
        if not self._heard(conn, data):
            await self._frames(conn, data)

    async def _frames(self, conn: _Conn, data: str | bytes) -> None:
        """A message that is not a lone heart-beat: its frames, handled in order."""
        conn.stomp.receive_data(data.encode() if isinstance(data, str) else data)
        while conn.close_after_flush is None:
            event = conn.stomp.next_event()
            if event is NEED_DATA:
                break
            if event is HEARTBEAT or not isinstance(event, Frame):
                continue
            conn.busy = True  # while we wait on an actor we read nothing: not the client's silence
            try:
                await self._handle(conn, event)
            except (_Close, RemoteProtocolError):
                raise
            except Exception:  # a bug must cost this frame an ERROR, never the process or a silent close
                log.exception("ws %d: %s frame failed", conn.id, event.command)
                self._error(conn, "internal error", f"the gateway failed to handle {event.command}", 1011)
            finally:
                conn.busy = False
                conn.last_rx = trio.current_time()

    def _fire(self, conn: _Conn) -> None:
        """Called by the shared ``Timers`` service when one of ``conn``'s deadlines is due: heart-beats out,
        heart-beat enforcement in, slow-consumer deadline, CONNECT deadline, and the watchdog that cuts a
        connection whose writer cannot finish (see the module docstring). Re-arms for the next real deadline.
        Each deadline is tested as ``deadline <= now`` with the very sum it is armed with: what the heap fires is
        always found due here (a rounding difference would fire the same entry again and again)."""
        now = self._now()
        if (tap := conn.tap) is not None:  # web._transport.HeartbeatTap
            if tap.resting:  # its heart-beats are read now; anything else it sent stays for its reader, woken
                if tap.drain():
                    conn.last_rx = now
            elif tap.lazy:  # from now on its heart-beats wait for us
                tap.rest()
        if conn.principal is None and conn.opened + self.cfg.connect_timeout <= now:
            self._error(conn, "no CONNECT", f"send CONNECT within {self.cfg.connect_timeout:g}s of opening", 1008)
        if conn.outbox.overdue(now):
            conn.outbox.fail(f"slow consumer: frames waited more than {conn.outbox.max_delay:g}s")
        if conn.expect_every and not conn.busy and conn.last_rx + 2 * conn.expect_every <= now:
            if conn.close_after_flush is None:
                log.info("ws %d: no heart-beat for %.2fs: closing", conn.id, now - conn.last_rx)
            self._error(conn, "heart-beat timeout", f"nothing received for {now - conn.last_rx:.1f}s", 1002)
        if conn.condemned_at is None and (conn.outbox.failed is not None or conn.close_after_flush is not None):
            conn.condemned_at = now
        if conn.condemned_at is not None:
            if conn.condemned_at + CLOSE_GRACE <= now:
                self.timers_nursery().start_soon(self._cut, conn)
            else:
                self.timers.arm(conn, conn.condemned_at + CLOSE_GRACE)
            return
        beat_slack = min(HEARTBEAT_SLACK, conn.send_every / 10)
        if conn.send_every and conn.last_tx + conn.send_every - beat_slack <= now:
            conn.last_tx = now
            if not self._heartbeat(conn):  # the stream broke under it: the next pass of the heap cuts it
                self.timers.arm(conn, now)
                return
        wake = math.inf
        if conn.principal is None:
            wake = conn.opened + self.cfg.connect_timeout
        if conn.expect_every:  # while busy, look again later: the reader resets last_rx when it is done
            wake = min(wake, conn.last_rx + 2 * conn.expect_every if not conn.busy else now + conn.expect_every)
        if (due := conn.outbox.due) is not None:
            wake = min(wake, due)
        slack = 0.0
        if conn.send_every and conn.last_tx + conn.send_every < wake:  # the heart-beat is next: it may go early
            wake, slack = conn.last_tx + conn.send_every, beat_slack
        self.timers.arm(conn, wake, slack)

    def _heartbeat(self, conn: _Conn) -> bool:
        """Send a heart-beat: straight into the socket when nothing else is queued or being sent (no task wakes),
        else through the outbox like any frame. False: the socket took part of it, so the stream is broken and
        the connection is condemned past its grace (cut at once)."""
        direct = conn.tap.send_heartbeat if conn.tap is not None else getattr(conn.io, "send_heartbeat_nowait", None)
        if direct is not None and conn.outbox.idle:
            try:
                if direct():
                    return True
            except TransportClosed as exc:  # the stream is broken mid-message: nothing more can go on it
                log.warning("ws %d: %s: cutting the TCP connection", conn.id, exc)
                conn.condemned_at = trio.current_time() - CLOSE_GRACE
                return False
        conn.raw(b"\n")
        return True

    async def _cut(self, conn: _Conn) -> None:
        """The writer did not finish within CLOSE_GRACE of the connection being condemned: it is stuck in a send
        to a client that does not read. Close the TCP connection under it; Hypercorn then cancels this handler."""
        log.warning(
            "ws %d: writer still busy %.1fs after the connection was condemned (%s): cutting the TCP connection",
            conn.id,
            CLOSE_GRACE,
            conn.outbox.failed or conn.close_after_flush,
        )
        abort = conn.io.abort if conn.io is not None else None
        if abort is None:
            log.error("ws %d: no way to cut the TCP connection; it stays open until the client goes away", conn.id)
            return
        await abort()

    # -- frames

    async def _handle(self, conn: _Conn, frame: Frame) -> None:
        receipt = frame.get("receipt")
        cmd = frame.command
        if cmd in ("CONNECT", "STOMP"):
            await self._connect(conn, frame)
            return
        if cmd == "SUBSCRIBE":
            await self._subscribe(conn, frame, receipt)  # it sends the RECEIPT itself, before any replay
            return
        if cmd == "UNSUBSCRIBE":
            await self._unsubscribe(conn, frame.get("id") or frame.get("destination") or "")
        elif cmd == "SEND":
            await self._send(conn, frame, receipt)
        elif cmd == "DISCONNECT":
            if receipt is not None:
                conn.raw(conn.stomp.send(Frame("RECEIPT", (("receipt-id", receipt),))))
            raise _Close(1000, "disconnect")
        # ACK, NACK, BEGIN, COMMIT, ABORT: accepted (messages are auto-acknowledged)
        self._receipt(conn, receipt)

    async def _release(self, conn: _Conn) -> None:
        """Detach every subscription and give the per-user slot back; idempotent (called again on cancel)."""
        if conn.principal is None or conn.released:
            return
        while conn.subs:
            dest = next(iter(conn.subs))
            try:
                await self._detach_dest(conn, dest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # the hub is gone: gateway shutting down
                log.debug("ws %d: sessions hub gone; %s not detached", conn.id, dest)
            del conn.subs[dest]  # only now: a Detach cancelled before delivery is sent again by the next call
            conn.prefixes.pop(dest, None)
        if conn.session_held and conn.client_id is not None:
            try:
                await self.h.sessions.send(Disconnect(conn.principal.user_id, conn.client_id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("ws %d: sessions hub gone; not disconnected", conn.id)
            conn.session_held = False
        conn.released = True
        self.counter.release(conn.principal.user_id)


async def _ignore(data: str | bytes) -> None:
    """The pump of a closed connection's inbox."""


def _unlink(conn: _Conn, inbox: PumpInbox | None) -> None:
    """Cut the references back to a closed connection from what it holds (its outbox's timer hook, its heart-beat
    tap's hook, the pump of the inbox it claimed: what quart still hands on goes nowhere), so that reference
    counting frees it as it goes: a cycle would wait for a full collection, which a frozen connection (web._gc)
    only gets at a thaw (``tests/test_stomp_endpoint.py``, freed without the collector)."""
    conn.outbox.on_due = None
    if conn.tap is not None:
        conn.tap.hook = None
        conn.tap = None
    if inbox is not None and inbox.pump is not None:
        inbox.pump = _ignore
