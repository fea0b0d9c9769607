"""The comfy actor against a scripted fake ComfyUI: trio-websocket server for /ws, httpx.MockTransport for HTTP.

Every test runs under MockClock(autojump_threshold=0) with jitter = identity, so backoff schedules, timeouts and
the ping watchdog are asserted in exact virtual seconds. Loopback TCP delivers within the send call, so the clock
never jumps while a frame is in flight.
"""

from __future__ import annotations

import collections
import itertools
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import TRANSCRIPTS, WORKFLOWS  # the recordings and workflows in tests/data
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from actors.comfy import (
    BackendEvent,
    BackendEvents,
    BackendLost,
    BackendSpec,
    BackendUp,
    CancelPrompt,
    CheckPrompts,
    ComfyCounters,
    ComfyReport,
    ComfyTimeouts,
    Executed,
    Executing,
    ExecutionStart,
    ExecutionSuccess,
    PreviewImage,
    Progress,
    ProgressState,
    PromptAccepted,
    PromptLocated,
    PromptRejected,
    PromptSubmitUnknown,
    RestartPolicy,
    SubmitPrompt,
    format_rejection,
    parse_comfy_message,
    run,
)

CLIENT_ID = "gw-7f3a"
FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
POLICY = RestartPolicy(initial_delay=0.5, max_delay=30.0, max_restarts=5, window=60.0, healthy_after=30.0)
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}


def no_jitter(delay: float) -> float:
    return delay


def status(queue_remaining: int, sid: str | None = None) -> str:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining}}}
    if sid is not None:
        data["sid"] = sid
    return json.dumps({"type": "status", "data": data})


def text(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


# ---- the fake ComfyUI -------------------------------------------------------------------------------------------


@dataclass
class Socket:
    """One WebSocket connection as the fake server saw it."""

    opened: float
    path: str
    headers: dict[str, str]
    first_message: Any = None
    closed: float | None = None


Script = Callable[[WebSocketConnection, Socket], Awaitable[None]]


async def hello(ws: WebSocketConnection, sock: Socket, queue_remaining: int = 0) -> None:
    """What ComfyUI does on connect: status with sid; then read the client's first message."""
    await ws.send_message(status(queue_remaining, sid=CLIENT_ID))
    sock.first_message = json.loads(await ws.get_message())


async def idle(ws: WebSocketConnection) -> None:
    """Read (and ignore) messages until the client closes; trio-websocket answers pings meanwhile."""
    while True:
        await ws.get_message()


async def stay(ws: WebSocketConnection, sock: Socket) -> None:
    """A healthy ComfyUI."""
    await hello(ws, sock)
    await idle(ws)


@dataclass
class FakeComfy:
    scripts: collections.deque[Script] = field(default_factory=collections.deque)  # one per connection, then `stay`
    reject_dials: int = 0  # answer this many upgrades with HTTP 503
    sockets: list[Socket] = field(default_factory=list)
    dials: list[float] = field(default_factory=list)  # every upgrade request, accepted or not
    open_now: collections.Counter[str] = field(default_factory=collections.Counter)
    max_open_same_client: int = 0
    http_log: list[tuple[float, str, str, Any, httpx.Headers]] = field(default_factory=list)
    routes: dict[tuple[str, str], Callable[[httpx.Request], Awaitable[httpx.Response]]] = field(default_factory=dict)
    port: int = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0, None)
        self.port = server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: WebSocketRequest) -> None:
        self.dials.append(trio.current_time())
        if self.reject_dials:
            self.reject_dials -= 1
            await request.reject(503)
            return
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        ws = await request.accept()
        client_id = request.path.partition("clientId=")[2]
        sock = Socket(trio.current_time(), request.path, headers)
        self.sockets.append(sock)
        self.open_now[client_id] += 1
        self.max_open_same_client = max(self.max_open_same_client, self.open_now[client_id])
        script = self.scripts.popleft() if self.scripts else stay
        try:
            await script(ws, sock)
            await ws.aclose()
        except* ConnectionClosed:  # the client went away: a handler must never kill serve_websocket (STACK-NOTES 2.9)
            pass
        finally:
            sock.closed = trio.current_time()
            self.open_now[client_id] -= 1

    # HTTP ---------------------------------------------------------------------------------------------------------

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._http)

    async def _http(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.raw_path.decode().partition("?")[0]  # as sent: %2F stays encoded
        self.http_log.append((trio.current_time(), request.method, path, body, request.headers))
        route = self.routes.get((request.method, path))
        if route is not None:
            return await route(request)
        if (request.method, path) == ("GET", "/system_stats"):
            return httpx.Response(200, json={"system": {"comfyui_version": "0.3.64"}, "devices": []})
        return httpx.Response(404)

    def requests(self, path: str | None = None) -> list[tuple[float, str, str, Any]]:
        return [(t, m, p, b) for t, m, p, b, _ in self.http_log if path is None or p == path]


def respond(*responses: httpx.Response | Exception) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    """A route answering with these, in order (the last one repeats); an exception instance is raised."""
    queue = list(responses)

    async def route(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return route


@dataclass
class Harness:
    inbox: trio.MemorySendChannel[Any]
    reports: trio.MemoryReceiveChannel[ComfyReport]
    counters: ComfyCounters
    unread: collections.deque[BackendEvent] = field(default_factory=collections.deque)

    async def next(self) -> tuple[float, ComfyReport]:
        """The next report; the events of a ``BackendEvents`` (one socket read) come one by one, as ``BackendEvent``."""
        if not self.unread:
            report = await self.reports.receive()
            if not isinstance(report, BackendEvents):
                return trio.current_time(), report
            assert report.events, "a batch holds at least one event"
            self.unread.extend(BackendEvent(report.backend, event) for event in report.events)
        return trio.current_time(), self.unread.popleft()

    async def until(self, stop: Callable[[ComfyReport], bool]) -> list[tuple[float, ComfyReport]]:
        got = []
        while True:
            got.append(await self.next())
            if stop(got[-1][1]):
                return got


@asynccontextmanager
async def actor(
    fake: FakeComfy,
    *,
    policy: RestartPolicy = POLICY,
    timeouts: ComfyTimeouts = ComfyTimeouts(),
    reports_size: int = 64,
) -> AsyncIterator[Harness]:
    inbox_tx, inbox_rx = trio.open_memory_channel[Any](8)
    reports_tx, reports_rx = trio.open_memory_channel[ComfyReport](reports_size)
    counters = ComfyCounters()
    async with trio.open_nursery() as nursery:
        await fake.serve(nursery)
        async with httpx.AsyncClient(transport=fake.transport) as http:
            await nursery.start(
                partial(
                    run,
                    BackendSpec("b0", fake.url),
                    inbox_rx,
                    reports_tx,
                    http=http,
                    client_id=CLIENT_ID,
                    policy=policy,
                    timeouts=timeouts,
                    jitter=no_jitter,
                    counters=counters,
                )
            )
            yield Harness(inbox_tx, reports_rx, counters)
            nursery.cancel_scope.cancel()


def is_up(report: ComfyReport) -> bool:
    return isinstance(report, BackendUp)


# ---- connection -------------------------------------------------------------------------------------------------


async def test_first_message_is_feature_flags_then_backend_up(autojump_clock: trio.testing.MockClock) -> None:
    async def busy(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock, queue_remaining=3)
        await idle(ws)

    fake = FakeComfy(scripts=collections.deque([busy]))
    async with actor(fake) as h:
        assert await h.next() == (0, BackendUp("b0", 3))
        assert h.counters.statistics().connected
        await trio.sleep(100)  # a healthy socket: pings answered, no reconnect
    sock = fake.sockets[0]
    assert sock.first_message == FEATURE_FLAGS
    assert sock.path == f"/ws?clientId={CLIENT_ID}"
    assert "origin" not in sock.headers
    assert len(fake.sockets) == 1 and fake.requests() == []  # no liveness check before the first dial
    stats = h.counters.statistics()
    assert stats.reconnects == 0 and not stats.down and stats.frames == 1


def _replay(name: str) -> list[str | bytes]:
    """The primary socket's frames of a transcript, binary ones rebuilt from their recorded headers."""
    frames: list[str | bytes] = []
    for line in (TRANSCRIPTS / name).read_text().splitlines():
        r = json.loads(line)
        if r["dir"] != "recv" or r.get("conn") != "primary":
            continue
        if r["kind"] == "text":
            frames.append(json.dumps(r["data"]))
        elif r["kind"] == "binary":
            d = r["data"]
            header = bytes.fromhex(d["header_hex"])
            image = bytes.fromhex(d.get("image_magic_hex", "")).ljust(d.get("image_len", 0), b"\x00")
            if d["event_type"] == 1:
                frames.append(header + image)
            elif d["event_type"] == 4:
                meta = json.dumps(d["metadata"]).encode()
                frames.append(struct.pack(">II", 4, len(meta)) + meta + image)
            else:
                frames.append(header + d["node_id"].encode() + d["text"].encode())
    return frames


async def test_events_forwarded_in_order_with_preview_attribution(autojump_clock: trio.testing.MockClock) -> None:
    recorded = _replay("progress_legacy_preview.jsonl")[1:]  # [0] is the on-connect status
    assert sum(isinstance(f, bytes) for f in recorded) == 4
    noise = ["{not json", text("logs", entries=[], size=None), text("feature_flags", max_upload_size=1), b"\x00\x01"]

    async def replay(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock)
        for i, frame in enumerate(recorded):
            await ws.send_message(frame)
            if i == 3:
                for junk in noise:
                    await ws.send_message(junk)
        await idle(ws)

    # What the registry must see: every frame parsed, in order, but progress_state and executing-a-node (noise
    # nobody needs, dropped unparsed); each type-1 preview takes the prompt and node of the progress before it.
    # Computed here independently of the actor's code.
    expected = []
    last: Progress | None = None
    dropped = 0
    for frame in recorded:
        event = parse_comfy_message(frame)
        if isinstance(event, ProgressState) or (isinstance(event, Executing) and event.node is not None):
            dropped += 1
            continue
        if isinstance(event, Progress):
            last = event
        if isinstance(event, PreviewImage):
            assert last is not None and event.prompt_id is None
            event = PreviewImage(event.mime, event.image, last.prompt_id, last.node)
        expected.append(BackendEvent("b0", event))

    fake = FakeComfy(scripts=collections.deque([replay]))
    async with actor(fake) as h:
        assert (await h.next())[1] == BackendUp("b0", 0)
        got = [(await h.next())[1] for _ in expected]
        assert got == expected
        previews = [r.event for r in got if isinstance(r.event, PreviewImage)]
        assert previews and all(p.prompt_id == previews[0].prompt_id and p.node_id == "3" for p in previews)
        await trio.testing.wait_all_tasks_blocked()
        assert (
            h.reports.statistics().current_buffer_used == 0 and not h.unread
        )  # nothing else (malformed, unknown, flags) came out
        stats = h.counters.statistics()
        assert (stats.malformed, stats.unknown, stats.frames) == (2, 1, 1 + len(recorded) + len(noise))
        assert dropped > 0 and h.counters.noise == dropped


async def test_preview_before_any_progress_keeps_no_ids(autojump_clock: trio.testing.MockClock) -> None:
    async def script(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock)
        await ws.send_message(struct.pack(">II", 1, 1) + b"\xff\xd8")
        await idle(ws)

    async with actor(FakeComfy(scripts=collections.deque([script]))) as h:
        await h.next()
        assert (await h.next())[1] == BackendEvent("b0", PreviewImage("image/jpeg", b"\xff\xd8"))


async def test_server_close_then_reconnect_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    def closes_after(seconds: float, code: int = 1001) -> Script:
        async def script(ws: WebSocketConnection, sock: Socket) -> None:
            await hello(ws, sock)
            await ws.send_message(text("execution_start", prompt_id="p1"))
            await trio.sleep(seconds)
            await ws.aclose(code, "restarting")

        return script

    # 1st socket lives 5 s; 2nd dies at once (backoff doubles); 3rd lives 41 s (healthy: backoff resets). Not 40:
    # trio-websocket's *server* crashes when a ping (every 10 s here) arrives while it closes.
    fake = FakeComfy(scripts=collections.deque([closes_after(5), closes_after(0), closes_after(41)]))
    async with actor(fake) as h:
        got = await h.until(lambda r: isinstance(r, BackendUp) and len(fake.sockets) == 4)
    lost = BackendLost("b0", "connection closed: 1001 GOING_AWAY restarting")
    event = BackendEvent("b0", parse_comfy_message(text("execution_start", prompt_id="p1")))
    assert got == [
        (0, BackendUp("b0", 0)),
        (0, event),
        (5, lost),
        (5.5, BackendUp("b0", 0)),
        (5.5, event),
        (5.5, lost),
        (6.5, BackendUp("b0", 0)),
        (6.5, event),
        (47.5, lost),
        (48.0, BackendUp("b0", 0)),
    ]
    assert [s.opened for s in fake.sockets] == [0, 5.5, 6.5, 48.0]
    assert [t for t, *_ in fake.requests("/system_stats")] == [5.5, 6.5, 48.0]  # liveness before every redial
    assert fake.max_open_same_client == 1
    assert all(s.closed is not None and s.closed <= n.opened for s, n in itertools.pairwise(fake.sockets))
    assert all(s.first_message == FEATURE_FLAGS for s in fake.sockets)
    assert h.counters.statistics().reconnects == 3


async def test_liveness_failure_counts_as_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    async def closes(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock)
        await trio.sleep(5)

    fake = FakeComfy(scripts=collections.deque([closes]))
    fake.routes[("GET", "/system_stats")] = respond(
        httpx.Response(500), httpx.ConnectError("refused"), httpx.Response(200, json={})
    )
    async with actor(fake) as h:
        got = await h.until(lambda r: isinstance(r, BackendUp) and len(fake.sockets) == 2)
    # one BackendLost for the whole outage: the failed checks at 5.5 and 6.5 are only logged
    assert got == [
        (0, BackendUp("b0", 0)),
        (5, BackendLost("b0", "connection closed: 1000 NORMAL_CLOSURE")),
        (8.5, BackendUp("b0", 0)),
    ]
    assert [t for t, *_ in fake.requests("/system_stats")] == [5.5, 6.5, 8.5]
    assert fake.dials == [0, 8.5]


async def test_no_first_status_is_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    async def mute(ws: WebSocketConnection, sock: Socket) -> None:
        sock.first_message = json.loads(await ws.get_message())
        await ws.get_message()  # sends nothing; ends when the client closes

    fake = FakeComfy(scripts=collections.deque([mute]))
    async with actor(fake, timeouts=ComfyTimeouts(first_status=10)) as h:
        got = await h.until(is_up)
    assert got == [(10, BackendLost("b0", "no status within 10s of connecting")), (10.5, BackendUp("b0", 0))]
    assert fake.sockets[0].closed == 10 and fake.max_open_same_client == 1


RawHandler = Callable[[trio.SocketStream, WSConnection, Any], Awaitable[bool]]


async def serve_raw(nursery: trio.Nursery, on_event: RawHandler) -> int:
    """A raw wsproto server on a free port: each connection's events go to ``on_event(stream, conn, event)``, which
    returns True to end the connection. Returns the port."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            conn = WSConnection(ConnectionType.SERVER)
            while data := await stream.receive_some(65536):
                conn.receive_data(data)
                for event in conn.events():
                    if await on_event(stream, conn, event):
                        return

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def serve_zombie(nursery: trio.Nursery, accepted: list[float]) -> int:
    """A raw wsproto server that accepts, sends status, then never reads again: it answers no ping."""

    async def on_event(stream: trio.SocketStream, conn: WSConnection, event: Any) -> bool:
        if isinstance(event, Request):
            accepted.append(trio.current_time())
            await stream.send_all(conn.send(AcceptConnection()))
            await stream.send_all(conn.send(TextMessage(data=status(0, sid=CLIENT_ID))))
            await trio.sleep_forever()
        return False

    return await serve_raw(nursery, on_event)


async def test_ping_watchdog_forces_reconnect(autojump_clock: trio.testing.MockClock) -> None:
    accepted: list[float] = []
    reports_tx, reports_rx = trio.open_memory_channel[ComfyReport](16)
    fake = FakeComfy()  # HTTP only
    timeouts = ComfyTimeouts(ping_interval=10, ping_timeout=10)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(transport=fake.transport) as http:
        port = await serve_zombie(nursery, accepted)
        _inbox_tx, inbox_rx = trio.open_memory_channel[Any](1)
        spec = BackendSpec("b0", f"http://127.0.0.1:{port}")
        nursery.start_soon(
            partial(
                run, spec, inbox_rx, reports_tx, http=http, client_id=CLIENT_ID, timeouts=timeouts, jitter=no_jitter
            )
        )
        got = []
        for _ in range(3):
            report = await reports_rx.receive()
            got.append((trio.current_time(), report))
        nursery.cancel_scope.cancel()
    # up at 0; ping at 10; no pong by 20; our close handshake gives up after 5 s (CLOSE_TIMEOUT); redial at 25.5
    assert got == [
        (0, BackendUp("b0", 0)),
        (25, BackendLost("b0", "silent socket: no pong within 10s")),
        (25.5, BackendUp("b0", 0)),
    ]
    assert accepted == [0, 25.5]


async def test_server_ping_answered_and_a_broken_frame_closes_with_1002(autojump_clock: trio.testing.MockClock) -> None:
    """A raw wsproto server: it pings (the actor must answer while it reads), then sends a masked frame (only clients
    mask): the actor closes with 1002, reports why, and redials; the events before the bad frame were reported."""
    seen: list[Any] = []

    async def on_event(stream: trio.SocketStream, conn: WSConnection, event: Any) -> bool:
        if isinstance(event, Request):
            await stream.send_all(conn.send(AcceptConnection()))
            await stream.send_all(conn.send(TextMessage(data=status(0, sid=CLIENT_ID))))
            if not seen:
                await stream.send_all(conn.send(Ping(payload=b"are you there")))
        elif isinstance(event, Pong):
            seen.append(event.payload)
            await stream.send_all(conn.send(TextMessage(data=text("execution_start", prompt_id="p1"))))
            await stream.send_all(b"\x81\x82abcd\x00\x00")  # masked
        elif isinstance(event, CloseConnection):
            seen.append(event.code)
            return True
        return False

    reports_tx, reports_rx = trio.open_memory_channel[ComfyReport](16)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(transport=FakeComfy().transport) as http:
        port = await serve_raw(nursery, on_event)
        _inbox_tx, inbox_rx = trio.open_memory_channel[Any](1)
        spec = BackendSpec("b0", f"http://127.0.0.1:{port}")
        nursery.start_soon(partial(run, spec, inbox_rx, reports_tx, http=http, client_id=CLIENT_ID, jitter=no_jitter))
        got = [await reports_rx.receive() for _ in range(4)]
        nursery.cancel_scope.cancel()
    assert got == [
        BackendUp("b0", 0),
        BackendEvents("b0", (ExecutionStart("p1"),)),
        BackendLost("b0", "connection closed: 1002 PROTOCOL_ERROR masked frame from the server"),
        BackendUp("b0", 0),
    ]
    assert seen == [b"are you there", 1002]


async def test_slow_registry_is_not_a_silent_socket(autojump_clock: trio.testing.MockClock) -> None:
    async def chatty(ws: WebSocketConnection, sock: Socket) -> None:
        await hello(ws, sock)
        for i in range(5):
            await ws.send_message(text("execution_start", prompt_id=f"p{i}"))
        await idle(ws)

    fake = FakeComfy(scripts=collections.deque([chatty]))
    async with actor(fake, reports_size=0, timeouts=ComfyTimeouts(ping_interval=10, ping_timeout=10)) as h:
        assert await h.next() == (0, BackendUp("b0", 0))
        await trio.sleep(60)  # the registry does not read for a minute: trio-websocket stops reading, no pong
        got = [(await h.next())[1] for _ in range(5)]
        assert [r.event.prompt_id for r in got] == [f"p{i}" for i in range(5)]  # type: ignore[union-attr]
        await trio.sleep(60)
        assert len(fake.sockets) == 1 and h.counters.statistics().connected


async def test_gave_up_then_slow_retries(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy(reject_dials=6)
    policy = RestartPolicy(initial_delay=0.5, max_restarts=2, window=60.0)
    async with actor(fake, policy=policy, timeouts=ComfyTimeouts(slow_retry=30)) as h:
        first = await h.until(lambda r: isinstance(r, BackendLost) and r.down)
        assert h.counters.statistics().down
        rest = await h.until(is_up)
    assert first == [
        (0, BackendLost("b0", "handshake rejected: HTTP 503")),
        (1.5, BackendLost("b0", "handshake rejected: HTTP 503", down=True)),
    ]
    # no more reports while down: the second round (31.5, 32, 33) gives up quietly; then the slow retry connects
    assert rest == [(63.0, BackendUp("b0", 0))]
    assert fake.dials == [0, 0.5, 1.5, 31.5, 32.0, 33.0, 63.0]
    assert [t for t, *_ in fake.requests("/system_stats")] == [0.5, 1.5, 31.5, 32.0, 33.0, 63.0]
    stats = h.counters.statistics()
    assert stats.connected and not stats.down and stats.reconnects == 6


async def test_refused_dial(autojump_clock: trio.testing.MockClock) -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports_tx, reports_rx = trio.open_memory_channel[ComfyReport](16)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(transport=FakeComfy().transport) as http:
        _inbox_tx, inbox_rx = trio.open_memory_channel[Any](1)
        nursery.start_soon(
            partial(run, BackendSpec("b0", f"http://127.0.0.1:{port}"), inbox_rx, reports_tx, http=http, client_id="c")
        )
        lost = await reports_rx.receive()
        nursery.cancel_scope.cancel()
    assert isinstance(lost, BackendLost) and not lost.down
    assert lost.reason.startswith(f"dial failed: all attempts to connect to 127.0.0.1:{port} failed")


async def test_inbox_closed_stops_the_actor(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()
    async with actor(fake) as h:
        await h.next()
        await h.inbox.aclose()
        with trio.fail_after(1):
            with pytest.raises(trio.EndOfChannel):  # the actor closed its report channel on the way out
                await h.reports.receive()
        await trio.testing.wait_all_tasks_blocked()
        assert fake.sockets[0].closed is not None and fake.open_now[CLIENT_ID] == 0


# ---- commands ---------------------------------------------------------------------------------------------------


async def submit(h: Harness, prompt_id: str = "p-1") -> tuple[float, ComfyReport]:
    await h.inbox.send(SubmitPrompt("t-1", prompt_id, WORKFLOW))
    return await h.next()


def validation_bodies() -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (TRANSCRIPTS / "validation_errors.jsonl").read_text().splitlines()]
    return [r["data"]["body"] for r in lines if r["kind"] == "response" and r["data"]["status"] == 400]


async def test_submit_accepted(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()
    node_errors = {"3": {"errors": [], "dependent_outputs": ["4"], "class_type": "ImageBlur"}}
    answer = {"prompt_id": "p-1", "number": 11, "node_errors": node_errors}
    fake.routes[("POST", "/prompt")] = respond(httpx.Response(200, json=answer))
    async with actor(fake) as h:
        await h.next()
        assert await submit(h) == (0, PromptAccepted("b0", "t-1", "p-1", 11, node_errors))
    [(_, _method, _path, body, headers)] = fake.http_log
    assert body == {"prompt": WORKFLOW, "client_id": CLIENT_ID, "prompt_id": "p-1"}
    assert "origin" not in headers


@pytest.mark.parametrize("body", validation_bodies(), ids=lambda b: b["error"]["type"])
async def test_submit_rejected_with_comfyui_400(autojump_clock: trio.testing.MockClock, body: dict[str, Any]) -> None:
    fake = FakeComfy()
    fake.routes[("POST", "/prompt")] = respond(httpx.Response(400, json=body))
    async with actor(fake) as h:
        await h.next()
        _, report = await submit(h)
    assert report == PromptRejected("b0", "t-1", "p-1", 400, format_rejection(400, body), body)
    assert report.detail.startswith(body["error"]["message"])


async def test_submit_rejected_with_500_text(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()
    text_500 = "500 Internal Server Error\n\nServer got itself in trouble"
    fake.routes[("POST", "/prompt")] = respond(httpx.Response(500, text=text_500))
    async with actor(fake) as h:
        await h.next()
        _, report = await submit(h)
    assert report == PromptRejected("b0", "t-1", "p-1", 500, "500 Internal Server Error Server got itself in trouble")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.ConnectError("connection refused"), "POST /prompt: ConnectError: connection refused"),
        (httpx.ReadTimeout("timed out"), "POST /prompt: ReadTimeout: timed out"),
        (httpx.Response(504, text="gateway timeout"), "HTTP 504 from a proxy"),
        (httpx.Response(200, text="OK"), "HTTP 200, unreadable body"),
    ],
)
async def test_submit_unknown(autojump_clock: trio.testing.MockClock, answer: Any, error: str) -> None:
    fake = FakeComfy()
    fake.routes[("POST", "/prompt")] = respond(answer)
    async with actor(fake) as h:
        await h.next()
        assert await submit(h) == (0, PromptSubmitUnknown("b0", "t-1", "p-1", error))


async def test_submit_times_out(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()

    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    fake.routes[("POST", "/prompt")] = hang
    async with actor(fake, timeouts=ComfyTimeouts(http=7)) as h:
        await h.next()
        assert await submit(h) == (7, PromptSubmitUnknown("b0", "t-1", "p-1", "POST /prompt: no answer within 7s"))


async def test_cancel_deletes_then_interrupts(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()
    fake.routes[("POST", "/queue")] = respond(httpx.ConnectError("reset"), httpx.Response(200))
    fake.routes[("POST", "/interrupt")] = respond(httpx.Response(200))
    async with actor(fake) as h:
        await h.next()
        await h.inbox.send(CancelPrompt("p-9"))  # /queue fails: logged, the interrupt is still sent
        await trio.testing.wait_all_tasks_blocked()
        await h.inbox.send(CancelPrompt("p-8"))
        await trio.testing.wait_all_tasks_blocked()
        assert h.reports.statistics().current_buffer_used == 0 and not h.unread  # cancel reports nothing
    assert [(m, p, b) for _, m, p, b in fake.requests()] == [
        ("POST", "/queue", {"delete": ["p-9"]}),
        ("POST", "/interrupt", {"prompt_id": "p-9"}),
        ("POST", "/queue", {"delete": ["p-8"]}),
        ("POST", "/interrupt", {"prompt_id": "p-8"}),
    ]


HISTORY_ENTRY = {
    "prompt": [3, "p-done", {}, {}, ["9"]],
    "outputs": {"9": {"images": []}},
    "status": {"status_str": "success"},
}


def queue_and_history(queue: httpx.Response | Exception) -> FakeComfy:
    fake = FakeComfy()
    fake.routes[("GET", "/queue")] = respond(queue)
    fake.routes[("GET", "/history/p-done")] = respond(httpx.Response(200, json={"p-done": HISTORY_ENTRY}))
    fake.routes[("GET", "/history/p-missing")] = respond(httpx.Response(200, json={}))
    fake.routes[("GET", "/history/p-broken")] = respond(httpx.ConnectError("reset"))
    fake.routes[("GET", "/history/p%2Fodd")] = respond(httpx.Response(200, json={}))
    return fake


QUEUE = {
    "queue_running": [[5, "p-run", {}, {"client_id": CLIENT_ID}, ["9"]]],
    "queue_pending": [[7, "p-pend", {}, {"client_id": CLIENT_ID}, ["9"]], [6, "p-other", {}, {}, ["9"]]],
}
IDS = ("p-run", "p-pend", "p-done", "p-missing", "p-broken", "p/odd")


async def test_check_prompts(autojump_clock: trio.testing.MockClock) -> None:
    fake = queue_and_history(httpx.Response(200, json=QUEUE))
    async with actor(fake) as h:
        await h.next()
        await h.inbox.send(CheckPrompts(IDS))
        got = [(await h.next())[1] for _ in IDS]
    assert got == [
        PromptLocated("b0", "p-run", "running"),
        PromptLocated("b0", "p-pend", "pending"),
        PromptLocated("b0", "p-done", "done", HISTORY_ENTRY),
        PromptLocated("b0", "p-missing", "missing"),
        PromptLocated("b0", "p-broken", "unknown"),
        PromptLocated("b0", "p/odd", "missing"),
    ]
    paths = [p for _, m, p, _ in fake.requests()]
    assert paths == ["/queue", "/history/p-done", "/history/p-missing", "/history/p-broken", "/history/p%2Fodd"]


async def test_check_prompts_without_queue(autojump_clock: trio.testing.MockClock) -> None:
    fake = queue_and_history(httpx.Response(500))
    async with actor(fake) as h:
        await h.next()
        await h.inbox.send(CheckPrompts(IDS))
        got = {r.prompt_id: r.where for _, r in [await h.next() for _ in IDS]}  # type: ignore[union-attr]
    # without /queue only a history entry is certain: "missing" could be pending, so it is "unknown"
    assert got == {
        "p-run": "unknown",
        "p-pend": "unknown",
        "p-done": "done",
        "p-missing": "unknown",
        "p-broken": "unknown",
        "p/odd": "unknown",
    }


async def test_commands_never_block_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeComfy()
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(1)
        in_flight -= 1
        return httpx.Response(200, json={"prompt_id": json.loads(request.content)["prompt_id"], "number": 1})

    fake.routes[("POST", "/prompt")] = slow
    async with actor(fake, reports_size=0) as h:
        assert (await h.next())[1] == BackendUp("b0", 0)
        for i in range(30):  # nobody reads reports: the loop still drains its inbox at once
            await h.inbox.send(SubmitPrompt(f"t{i}", f"p{i}", WORKFLOW))
        await trio.testing.wait_all_tasks_blocked()
        assert h.inbox.statistics().current_buffer_used == 0
        await trio.sleep(10)
        got = sorted(r.prompt_id for _, r in [await h.next() for _ in range(30)])  # type: ignore[union-attr]
    assert got == sorted(f"p{i}" for i in range(30))
    assert peak == 8  # COMMAND_CONCURRENCY
    assert trio.current_time() >= 4  # 30 requests of 1 s, 8 at a time


@pytest.mark.parametrize("url", ["ws://127.0.0.1:8188", "127.0.0.1:8188", "http://", "http:///x"])
def test_backend_spec_validation(url: str) -> None:
    with pytest.raises(ValueError, match="url must be http"):
        BackendSpec("b0", url)


def test_ws_url() -> None:
    from actors.comfy._connection import Dial

    dial = Dial.from_url("http://127.0.0.1:8188", "a b")
    assert dial == Dial("127.0.0.1", 8188, False, "127.0.0.1:8188", "/ws?clientId=a+b")
    assert dial.url == "ws://127.0.0.1:8188/ws?clientId=a+b"
    dial = Dial.from_url("https://user:pw@gpu.example/comfy/", "c1")
    assert dial == Dial("gpu.example", 443, True, "gpu.example", "/comfy/ws?clientId=c1")
    assert dial.url == "wss://gpu.example/comfy/ws?clientId=c1"


# ---- against the ComfyUI simulator (scripts/fake_comfyui.py) ----------------------------------------------------


async def test_txt2img_against_the_simulator(autojump_clock: trio.testing.MockClock) -> None:
    from fake_comfyui import FakeComfyUI  # scripts/ is on pythonpath (pyproject)

    workflow = json.loads((WORKFLOWS / "txt2img.json").read_text())
    sim = FakeComfyUI()
    inbox_tx, inbox_rx = trio.open_memory_channel[Any](8)
    reports_tx, reports_rx = trio.open_memory_channel[ComfyReport](64)
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
        port = await nursery.start(sim.serve)
        spec = BackendSpec("sim", f"http://127.0.0.1:{port}")
        nursery.start_soon(partial(run, spec, inbox_rx, reports_tx, http=http, client_id=CLIENT_ID, jitter=no_jitter))
        assert await reports_rx.receive() == BackendUp("sim", 0)
        await inbox_tx.send(SubmitPrompt("t-1", "p-txt2img", workflow))
        accepted, events = None, []
        with trio.fail_after(120):
            # the prompt's events may arrive before the HTTP answer: wait for both
            while accepted is None or events[-1:] != [Executing("p-txt2img", None)]:
                report = await reports_rx.receive()
                if isinstance(report, PromptAccepted):
                    accepted = report
                elif isinstance(report, BackendEvents):
                    events += [e for e in report.events if getattr(e, "prompt_id", None) == "p-txt2img"]
        nursery.cancel_scope.cancel()
    assert accepted.prompt_id == "p-txt2img" and accepted.node_errors == {}
    kinds = [type(e) for e in events]
    assert kinds[0] is ExecutionStart and kinds[-2:] == [ExecutionSuccess, Executing]
    # noise is dropped before the registry hop: no progress_state, no executing for a node
    assert ProgressState not in kinds and [e.node for e in events if isinstance(e, Executing)] == [None]
    executed = [e for e in events if isinstance(e, Executed)]
    assert executed and executed[0].node == "9" and executed[0].output is not None
    images = executed[0].output["images"]
    assert images and all(image["type"] == "output" and image["filename"].endswith(".png") for image in images)
    assert kinds.index(Executed) < kinds.index(ExecutionSuccess)
    steps = [e for e in events if isinstance(e, Progress) and e.node == "3"]
    assert [s.value for s in steps] == list(range(1, 21)) and {s.max for s in steps} == {20}
    previews = [e for e in events if isinstance(e, PreviewImage)]
    assert len(previews) == 20 and all(p.node_id == "3" and p.image.startswith(b"\x89PNG") for p in previews)
