"""The WebSocket half of a comfy actor: one socket at a time, under a supervisor, reporting events and state.

ComfyUI keeps one socket per clientId and a second socket *replaces* the first; when the older one then closes,
the server forgets the newer one too (docs/comfyui-protocol.md section 2.2). So a new dial starts only after the
previous socket is fully closed (close handshake done or timed out, TCP stream closed). Crashes (refused dial,
handshake rejected, server close, no first ``status``, silent socket) are restarted by ``supervise`` with backoff,
each redial after a crash preceded by an HTTP liveness check (GET /system_stats). When the supervisor gives up,
the backend is reported down and retried every ``slow_retry`` seconds, forever.

Two watchdogs run beside the reader. The ping watchdog catches a dead TCP connection (no pong). The activity
watchdog catches a socket that is alive but no longer registered at ComfyUI (the same-clientId trap, which still
answers pings): after an accepted submit ComfyUI always broadcasts a ``status``, so no frame at all within
``status_after_submit`` means we are deaf; and while ComfyUI has work queued, no frame within ``silence`` is
suspicious too. Either forces a reconnect, which the registry follows with a reconciliation.

Reports describe state *changes*: ``BackendUp`` after every (re)connect, ``BackendLost`` when a connected (or never
yet connected) backend is lost, ``BackendLost(down=True)`` once the supervisor gives up. Further failed attempts
while already lost or down are only logged, so a dead backend does not flood the registry.

The socket is read in the session's own task (``_wsclient.WebSocket``, wsproto): one read of the TCP stream gives
every message in it; noise is dropped by its head before any parse (``is_noise``), the rest is parsed and reported
to the registry as one ``BackendEvents`` per read. Memory budget: one message being assembled and the messages of
one read being parsed, each at most ``MAX_FRAME_SIZE`` (full-size ``SaveImageWebsocket`` PNGs reach several MB), so
about 64 MiB per backend in the worst case.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

import httpx
import trio

from ._commands import HTTPFailed, request
from ._config import ComfyCounters, ComfyTimeouts
from ._events import ComfyEvent, FeatureFlags, PreviewImage, Progress, Status, UnknownComfyEvent
from ._messages import BackendEvents, BackendLost, BackendUp, ComfyReport
from ._protocol import ComfyProtocolError, is_noise, parse_comfy_message, parse_progress
from ._supervisor import RestartPolicy, SupervisorGaveUp, supervise
from ._wsclient import HandshakeFailed, HandshakeRejected, SocketClosed, WebSocket

log = logging.getLogger(__name__)

MAX_FRAME_SIZE: Final = 32 * 2**20  # 32 MiB: one WebSocket message (full-size PNG previews are big)
CLOSE_TIMEOUT: Final = 5.0  # seconds for our close handshake; a zombie never answers, its TCP is then just closed
FEATURE_FLAGS_MESSAGE: Final = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})


class ComfyDisconnected(Exception):
    """One connection attempt ended: dial failed, liveness check failed, socket closed or went silent."""


@dataclass(frozen=True, slots=True)
class Dial:
    """Where the WebSocket goes: ws://host:port/<prefix>/ws?clientId=... (wss for an https backend)."""

    host: str
    port: int
    ssl: bool
    host_header: str
    resource: str

    @classmethod
    def from_url(cls, base: str, client_id: str) -> Dial:
        parts = urllib.parse.urlsplit(base)
        tls = parts.scheme == "https"
        if parts.hostname is None:
            raise ValueError(f"no host in {base!r}")
        resource = parts.path.rstrip("/") + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        netloc = parts.netloc.rpartition("@")[2]  # never send credentials in the Host header
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, netloc, resource)

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl else 'ws'}://{self.host_header}{self.resource}"


def describe(exc: BaseException) -> str:
    """A short reason for a lost connection, for BackendLost and the logs."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, SocketClosed):
        return f"connection closed: {exc}"
    if isinstance(exc, HandshakeRejected):
        return f"handshake rejected: {exc}"
    if isinstance(exc, HandshakeFailed):
        return f"handshake failed: {exc}"
    if isinstance(exc, ComfyDisconnected):
        return str(exc)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class _Link:
    """Per-socket state, fresh for every connection attempt."""

    __slots__ = ("last_progress", "lost", "reporting", "stalls")

    def __init__(self) -> None:
        self.last_progress: Progress | None = None  # attributes type-1 previews, which carry no ids
        self.lost: str | None = None  # why we dropped the socket, when the close itself may fail too
        self.reporting = False  # the reader is blocked on the report channel right now
        self.stalls = 0  # how often the reader was blocked on the report channel


class Connection:
    def __init__(
        self,
        name: str,
        base: str,
        dial: Dial,
        reports: trio.MemorySendChannel[ComfyReport],
        http: httpx.AsyncClient,
        timeouts: ComfyTimeouts,
        counters: ComfyCounters,
    ) -> None:
        self.name = name
        self.base = base
        self.dial = dial
        self.reports = reports
        self.http = http
        self.timeouts = timeouts
        self.counters = counters
        self.lost_reported = False  # BackendLost sent since the last BackendUp (or since start)
        self.after_failure = False  # the next dial follows a failure: check liveness first
        self.last_frame = float("-inf")  # trio time of the last frame read (or of the reader's last wait on reports)
        self.queue_remaining = 0  # ComfyUI's last status: prompts pending + running there (anyone's)
        self.submit_unconfirmed: float | None = None  # oldest accepted submit not followed by any frame yet
        self._activity_changed = trio.Event()

    def note_submitted(self, sent_at: float) -> None:
        """A submit that started at ``sent_at`` was accepted: some frame (its ``status`` broadcast) must follow.

        Called by the command half; frames read since ``sent_at`` already prove the socket is registered.
        """
        if self.last_frame >= sent_at:
            return
        if self.submit_unconfirmed is None or sent_at < self.submit_unconfirmed:
            self.submit_unconfirmed = sent_at
            self._activity_changed.set()

    def _saw_activity(self) -> None:
        self.last_frame = trio.current_time()
        if self.submit_unconfirmed is not None and self.last_frame >= self.submit_unconfirmed:
            self.submit_unconfirmed = None

    async def keep_connected(self, policy: RestartPolicy, jitter: Callable[[float], float]) -> None:
        """Forever: supervise connection attempts; when the supervisor gives up, report down and retry slowly."""
        while True:
            try:
                await supervise(f"comfy {self.name}", self._attempt, policy, jitter=jitter)
            except SupervisorGaveUp as exc:
                reason = describe(exc.__cause__) if exc.__cause__ is not None else str(exc)
                if not self.counters.down:
                    self.counters.down = True
                    await self.reports.send(BackendLost(self.name, reason, down=True))
                log.warning("%s: backend down (%s); retrying in %.1fs", self.name, exc, self.timeouts.slow_retry)
                await trio.sleep(self.timeouts.slow_retry)

    async def _attempt(self) -> None:
        """One connection: liveness check if needed, dial, read until lost. Always ends with ComfyDisconnected."""
        try:
            if self.after_failure:
                await self._check_alive()
            self.counters.attempts += 1
            await self._connect()
            raise ComfyDisconnected("session ended")  # pragma: no cover - _connect only ever raises
        except Exception as exc:  # any crash is a lost connection for the registry; the supervisor restarts
            self.after_failure = True
            self.counters.connected = False
            reason = describe(exc)
            if not self.lost_reported and not self.counters.down:
                self.lost_reported = True
                await self.reports.send(BackendLost(self.name, reason))
            if isinstance(exc, ComfyDisconnected):
                raise
            raise ComfyDisconnected(reason) from exc

    async def _check_alive(self) -> None:
        try:
            response = await request(self.http, self.base, "GET", "/system_stats", timeout=self.timeouts.http)
        except HTTPFailed as exc:
            raise ComfyDisconnected(f"liveness check failed: {exc}") from exc
        if response.status_code != 200:
            raise ComfyDisconnected(f"liveness check failed: GET /system_stats -> HTTP {response.status_code}")

    async def _connect(self) -> None:
        """Dial, run the session, close. The TCP stream is ours, so it is closed however the socket ends.

        Returns only after the socket is fully closed (our close handshake done or timed out, the TCP stream closed):
        the one-socket-per-clientId rule.
        """
        link = _Link()
        try:
            with trio.fail_after(self.timeouts.http):
                stream = await self._open_stream()
        except OSError as exc:
            raise ComfyDisconnected(f"dial failed: {exc}") from exc
        except trio.TooSlowError:
            raise ComfyDisconnected(f"dial failed: no connection within {self.timeouts.http}s") from None
        async with stream:
            try:
                with trio.fail_after(self.timeouts.http):
                    ws = await WebSocket.connect(
                        stream, self.dial.host_header, self.dial.resource, max_message=MAX_FRAME_SIZE
                    )
                try:
                    await self._session(ws, link)
                finally:
                    # Not shielded: when we are cancelled no close handshake could complete; the TCP stream is
                    # then just closed (async with stream), which ComfyUI handles.
                    with trio.move_on_after(CLOSE_TIMEOUT):  # a zombie never answers our close
                        await ws.aclose()
            except Exception as exc:
                raise ComfyDisconnected(link.lost or describe(exc)) from exc

    async def _open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if self.dial.ssl:
            return await trio.open_ssl_over_tcp_stream(
                self.dial.host, self.dial.port, ssl_context=ssl.create_default_context(), https_compatible=True
            )
        return await trio.open_tcp_stream(self.dial.host, self.dial.port)

    async def _session(self, ws: WebSocket, link: _Link) -> None:
        await ws.send_text(FEATURE_FLAGS_MESSAGE)
        status: Status | None = None
        after: tuple[ComfyEvent, ...] = ()
        with trio.move_on_after(self.timeouts.first_status):
            status, after = await self._first_status(ws, link)
        if status is None:
            raise ComfyDisconnected(f"no status within {self.timeouts.first_status}s of connecting")
        self.counters.connected = True
        self.counters.down = False
        self.lost_reported = False
        log.info("%s: connected to %s (queue_remaining=%d)", self.name, self.dial.url, status.queue_remaining)
        await self.reports.send(BackendUp(self.name, status.queue_remaining))
        self._saw_activity()  # the time spent handing BackendUp over is not silence
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog, ws, link)
            nursery.start_soon(self._activity_watchdog, link)
            if after:
                await self._report(BackendEvents(self.name, after), link)
            while True:
                await self._report(BackendEvents(self.name, await self._next_events(ws, link)), link)

    async def _first_status(self, ws: WebSocket, link: _Link) -> tuple[Status, tuple[ComfyEvent, ...]]:
        """ComfyUI's on-connect status (it is reported as BackendUp, not as an event), and the events read after it.

        ComfyUI sends its status first; events before it (just in case) are reported at once."""
        while True:
            events = await self._next_events(ws, link)
            for i, event in enumerate(events):
                if isinstance(event, Status):
                    if i:
                        await self._report(BackendEvents(self.name, events[:i]), link)
                    return event, events[i + 1 :]
            await self._report(BackendEvents(self.name, events), link)

    async def _next_events(self, ws: WebSocket, link: _Link) -> tuple[ComfyEvent, ...]:
        """The events worth reporting from the next read(s) of the socket, at least one; skips noise, malformed
        frames, feature flags and unknown types."""
        counters = self.counters
        while True:
            messages = await ws.receive_messages()
            if not messages:
                continue  # only control frames, or a part of a message
            counters.frames += len(messages)
            self._saw_activity()
            events: list[ComfyEvent] = []
            for message in messages:
                if type(message) is str:
                    if (progress := parse_progress(message)) is not None:  # half the frames: what _keep does
                        link.last_progress = progress
                        events.append(progress)
                        continue
                    if is_noise(message):
                        counters.noise += 1
                        continue
                try:
                    event = parse_comfy_message(message)
                except ComfyProtocolError as exc:
                    counters.malformed += 1
                    log.warning("%s: skipped a malformed frame: %s", self.name, exc)
                    continue
                if (kept := self._keep(event, link)) is not None:
                    events.append(kept)
            if events:
                return tuple(events)

    def _keep(self, event: ComfyEvent, link: _Link) -> ComfyEvent | None:
        """The event as the registry gets it, or None when nobody needs it."""
        if isinstance(event, Progress):
            link.last_progress = event
        elif isinstance(event, FeatureFlags):
            log.debug("%s: server features %s", self.name, event.flags)
            return None
        elif isinstance(event, UnknownComfyEvent):
            self.counters.unknown += 1
            log.debug("%s: ignored event of unknown type %r", self.name, event.type)
            return None
        elif isinstance(event, Status):
            if (event.queue_remaining > 0) != (self.queue_remaining > 0):
                self._activity_changed.set()  # the silence watchdog starts or stops watching
            self.queue_remaining = event.queue_remaining
        elif isinstance(event, PreviewImage) and event.prompt_id is None and link.last_progress is not None:
            # Type-1 previews carry no ids: ComfyUI sends them right after the progress they belong to.
            return replace(event, prompt_id=link.last_progress.prompt_id, node_id=link.last_progress.node)
        return event

    async def _report(self, report: ComfyReport, link: _Link) -> None:
        try:
            self.reports.send_nowait(report)
        except trio.WouldBlock:
            link.stalls += 1
            link.reporting = True
            try:
                await self.reports.send(report)
            finally:
                link.reporting = False
                self._saw_activity()  # we were not reading meanwhile: that time is not the server's silence
                self._activity_changed.set()

    async def _watchdog(self, ws: WebSocket, link: _Link) -> None:
        """Ping every ping_interval; no pong within ping_timeout means a zombie socket: force a reconnect.

        While our reader is blocked on a full report channel it does not read the socket, so a pong cannot arrive:
        such a window is not held against the server.
        """
        while True:
            await trio.sleep(self.timeouts.ping_interval)
            stalls = link.stalls
            try:
                with trio.move_on_after(self.timeouts.ping_timeout) as waiting:
                    await ws.ping()
            except SocketClosed:
                return  # the reader still drains what arrived before the close, then reports it
            if not waiting.cancelled_caught:
                continue
            if link.reporting or link.stalls != stalls:
                log.debug("%s: no pong while the registry was slow; not counted", self.name)
                continue
            link.lost = f"silent socket: no pong within {self.timeouts.ping_timeout}s"
            raise ComfyDisconnected(link.lost)

    async def _activity_watchdog(self, link: _Link) -> None:
        """Reconnect a socket that stays silent after an accepted submit, or while ComfyUI has work queued."""
        while True:
            deadlines = []
            if self.submit_unconfirmed is not None:
                deadlines.append((self.submit_unconfirmed + self.timeouts.status_after_submit, "submit"))
            if self.queue_remaining > 0:
                deadlines.append((self.last_frame + self.timeouts.silence, "busy"))
            self._activity_changed = trio.Event()
            if not deadlines:
                await self._activity_changed.wait()
                continue
            deadline, why = min(deadlines)
            with trio.move_on_at(deadline):
                await self._activity_changed.wait()
                continue
            if link.reporting:  # our reader is blocked on the registry, not the server on us: wait for it
                self._activity_changed = trio.Event()
                await self._activity_changed.wait()
                continue
            now = trio.current_time()
            unconfirmed = self.submit_unconfirmed
            if why == "submit" and unconfirmed is not None and now >= unconfirmed + self.timeouts.status_after_submit:
                link.lost = f"no status within {self.timeouts.status_after_submit}s of an accepted submit"
            elif why == "busy" and self.queue_remaining > 0 and now >= self.last_frame + self.timeouts.silence:
                link.lost = f"silent socket: nothing for {self.timeouts.silence}s while ComfyUI has work queued"
            else:
                continue  # a frame came meanwhile: compute the next deadline
            self.submit_unconfirmed = None  # the reconnect (and the registry's reconciliation) answers it
            raise ComfyDisconnected(link.lost)
