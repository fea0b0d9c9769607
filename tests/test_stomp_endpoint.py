"""The STOMP endpoint at /ws over real sockets (issue 3): security with 100 users and forgers, heart-beats,
receipts, graceful shutdown, slow consumers, and the limits (CONNECT deadline, frame size, subscriptions,
connections per user, permessage-deflate).

Rules: 127.0.0.1 and port 0 only; no sleeping to let something happen (tests wait for frames, closes and
conditions under ``trio.fail_after`` nets); where timing is the point, intervals are 100-300 ms and the
assertions are about order, causality and lower bounds, which a slow machine cannot break.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import socket
import statistics
import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import GatewayUnderTest, parts, wait_backends_up, workflow
from fake_comfyui import FakeComfyUI
from stomp_client import Received, StompClient, stomp_connect
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from actors import sessions
from actors._util import ask
from web._ws import CLOSE_GRACE
from web.auth import Authenticator

TERMINAL = ("completed", "execution_error", "cancelled")


# ---- helpers ------------------------------------------------------------------------------------------------


def quick_workflow(steps: int = 2) -> dict[str, Any]:
    wf = copy.deepcopy(workflow("txt2img"))
    for node in wf.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return wf


async def subscribed(c: StompClient, destination: str = "/user/topic/messages") -> None:
    await c.send_frame("SUBSCRIBE", {"id": "sub-0", "destination": destination, "receipt": "sub"})
    frame = await c.next_frame()
    while destination == "/topic/messages" and frame.command == "MESSAGE":  # the current status may come first
        frame = await c.next_frame()
    assert frame.command == "RECEIPT" and frame.headers["receipt-id"] == "sub", frame


async def until_receipt(c: StompClient, receipt_id: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """The MESSAGEs that arrive before the RECEIPT for ``receipt_id``."""
    msgs = []
    while True:
        frame = await c.next_frame()
        if frame.command == "RECEIPT" and frame.headers["receipt-id"] == receipt_id:
            return msgs
        assert frame.command == "MESSAGE", frame
        msgs.append((frame.headers, frame.json()))


async def close_code(c: StompClient, timeout: float = 10) -> int:
    """Read until the server closes the WebSocket (frames still on the wire are skipped); its close code."""
    with trio.fail_after(timeout):
        while True:
            try:
                await c.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code  # type: ignore[no-any-return]


async def error_then_close(
    c: StompClient, message: str | None = None, timeout: float = 10, *, after_messages: bool = False
) -> tuple[Received, int]:
    """The next frame (after any MESSAGEs, if allowed) is an ERROR with a ``message`` header, then the socket
    closes."""
    frame = await c.next_frame(timeout)
    while after_messages and frame.command == "MESSAGE":
        frame = await c.next_frame(timeout)
    assert frame.command == "ERROR", (frame.command, frame.headers, frame.body)
    assert frame.headers.get("message"), frame.headers
    if message is not None:
        assert frame.headers["message"] == message, frame.headers
    code = await close_code(c, timeout)
    assert code != 1006, "closed without a close frame"
    return frame, code


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for state that announces itself nowhere (task trees, counters); the clock is only a safety net."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def endpoint_tasks() -> list[str]:
    """Names of the per-connection tasks of the endpoint alive anywhere in this run: quart's websocket handler (the
    connection's writer; quart's message task feeds the STOMP parser) and a ``web._ws`` reader where there is one."""
    names: list[str] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                if child.name.startswith("web._ws.") or child.name.endswith("WebsocketConnection.handle_websocket"):
                    names.append(child.name)
                todo.append(child)
    return names


async def hub_stats(g_app: Any) -> sessions.HubStats:
    with trio.fail_after(5):
        return await ask(parts(g_app)["handles"].sessions, lambda r: sessions.GetStats(r))


class RawClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed ({code})")
        self.code = code  # None: the TCP connection ended without a close frame


class RawWs:
    """A WebSocket client made of wsproto on a plain trio socket. It reads only when asked to (so a test can
    make it stop reading altogether), shows the negotiated extensions, and quacks enough like trio-websocket's
    connection (``send_message``/``get_message``) for ``StompClient`` to run on it."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream, self.ws = stream, ws
        self.events: deque[Any] = deque()
        self.accepted: AcceptConnection | None = None
        self.text: list[str] = []

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None, deflate: bool = False, target: str = "/ws") -> RawWs:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        raw = cls(trio.SocketStream(sock), WSConnection(ConnectionType.CLIENT))
        await raw.stream.send_all(
            raw.ws.send(
                Request(
                    host=f"127.0.0.1:{port}",
                    target=target,
                    subprotocols=["v12.stomp"] if target == "/ws" else [],
                    extensions=[PerMessageDeflate()] if deflate else [],
                )
            )
        )
        event = await raw._next_event()
        if isinstance(event, RejectConnection):
            raise AssertionError(f"handshake refused: {event.status_code}")
        assert isinstance(event, AcceptConnection), event
        raw.accepted = event
        return raw

    async def _next_event(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(1 << 16)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
            if not data and not self.events:
                raise RawClosed(None)
        return self.events.popleft()

    async def send_message(self, data: str | bytes) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data if isinstance(data, str) else data.decode())))

    async def get_message(self) -> str:
        while True:
            try:
                event = await self._next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionResetError):
                raise RawClosed(None) from None
            if isinstance(event, TextMessage):
                self.text.append(event.data)
                if event.message_finished:
                    data, self.text = "".join(self.text), []
                    return data
            elif isinstance(event, Ping):
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise RawClosed(event.code)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def until_closed(ws: RawWs) -> int | None:
    """Read until the server ends the connection; its close code (None: no close frame, the TCP connection ended)."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.get_message()
            except RawClosed as exc:
                return exc.code


# ---- 1. security -------------------------------------------------------------------------------------------

N_USERS = 100
FORGERIES = (
    "no_token",
    "expired",
    "other_secret",
    "foreign_cid",
    "sub_other_user",
    "sub_topic_other",
    "sub_queue",
    "send_elsewhere",
    "cancel_foreign",
    "body_client_id",
)
BAD_SEND_DESTINATIONS = (
    "/topic/messages",
    "/user/topic/messages",
    "/app/other",
    "/user/u000/topic/messages",
    "/queue/tasks",
)


async def test_100_users_with_forgers_see_only_their_own_messages(nursery: trio.Nursery, start_gateway: Any) -> None:
    sims = [FakeComfyUI(step_ms=5, seed=i) for i in range(4)]
    for s in sims:
        await nursery.start(s.serve)
    g: GatewayUnderTest = await start_gateway([s.url for s in sims], max_inflight=4)
    await wait_backends_up(g, len(sims))
    wf = quick_workflow()
    users = [f"u{i:03d}" for i in range(N_USERS)]
    client_of = {u: f"c{u[1:]}" for u in users}
    owned: dict[tuple[str, str], set[str]] = defaultdict(set)  # (user, clientId) -> its task ids
    seen: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []  # every MESSAGE any client got
    task_of: dict[str, str] = {}
    queued = {u: trio.Event() for u in users}
    final: dict[str, str] = {}
    outcomes: dict[str, list[str]] = defaultdict(list)  # forgery kind -> what it got
    cancelled_live = 0  # foreign cancels sent while the victim's task was still under way
    other_secret = Authenticator(b"other-secret-0123456789-abcdefghijkl")

    def keep(user: str, client: str, msgs: list[tuple[dict[str, str], dict[str, Any]]]) -> None:
        seen.extend((user, client, h, m) for h, m in msgs)

    async def legit(user: str) -> None:
        client = client_of[user]
        async with stomp_connect(g.ws_url, token=g.token(user, client_id=client), client_id=client) as c:
            await subscribed(c)
            await c.send_frame(
                "SEND",
                {"destination": "/app/tasks", "content-type": "application/json"},
                json.dumps({"workflow": wf, "size": 1}),
            )
            msgs = await c.collect_until(lambda m: m.get("type") in ("queued", "rejected"), timeout=30)
            keep(user, client, msgs)
            assert msgs[-1][1]["type"] == "queued", msgs[-1]
            task_id = msgs[-1][1]["taskId"]
            owned[(user, client)].add(task_id)
            task_of[user] = task_id
            queued[user].set()
            msgs = await c.collect_until(lambda m: m.get("taskId") == task_id and m["type"] in TERMINAL, timeout=45)
            keep(user, client, msgs)
            final[user] = msgs[-1][1]["type"]

    async def refused(kind: str, c: StompClient) -> None:
        frame, _ = await error_then_close(c)
        outcomes[kind].append(f"ERROR {frame.headers['message']}")

    async def forger(i: int) -> None:
        nonlocal cancelled_live
        user, victim = users[i], users[(i + 1) % N_USERS]
        kind = FORGERIES[i % len(FORGERIES)]
        me = f"f{i:03d}"
        if kind in ("no_token", "expired", "other_secret", "foreign_cid"):
            token = {
                "no_token": None,
                "expired": g.token(user, ttl=-60),
                "other_secret": other_secret.issue(user),
                "foreign_cid": g.token(user, client_id=client_of[user]),
            }[kind]
            async with stomp_connect(g.ws_url, token=token, client_id=me, expect_connected=False) as c:
                await refused(kind, c)
            return
        async with stomp_connect(g.ws_url, token=g.token(user, client_id=me), client_id=me) as c:
            if kind == "sub_other_user":
                await c.subscribe(f"/user/{victim}/topic/messages")
            elif kind == "sub_topic_other":
                await c.subscribe("/topic/other")
            elif kind == "sub_queue":
                await c.subscribe("/queue/x")
            elif kind == "send_elsewhere":
                await c.send_frame(
                    "SEND",
                    {"destination": BAD_SEND_DESTINATIONS[i % len(BAD_SEND_DESTINATIONS)]},
                    json.dumps({"workflow": wf, "taskId": "x"}),
                )
            if kind in ("sub_other_user", "sub_topic_other", "sub_queue", "send_elsewhere"):
                await refused(kind, c)
                return
            await subscribed(c)
            if kind == "cancel_foreign":  # the victim's real, live task id
                with trio.fail_after(30):
                    await queued[victim].wait()
                cancelled_live += victim not in final
                await c.send_frame("SEND", {"destination": "/app/cancel"}, json.dumps({"taskId": task_of[victim]}))
            else:  # body_client_id: another session's clientId, the victim's or this user's own legit one
                target = client_of[victim] if i % 2 else client_of[user]
                await c.send_frame(
                    "SEND", {"destination": "/app/tasks"}, json.dumps({"clientId": target, "workflow": wf, "size": 1})
                )
            msgs = await c.collect_until(lambda m: m.get("type") == "rejected")
            keep(user, me, msgs)
            outcomes[kind].append(f"rejected {msgs[-1][1]['error']}")
            # not a protocol error: the connection stays usable, and ends when the client says so
            await c.send_frame("DISCONNECT", {"receipt": "bye"})
            keep(user, me, await until_receipt(c, "bye"))  # this user's balance messages may come first
            assert await close_code(c) == 1000

    with trio.fail_after(50):
        async with trio.open_nursery() as crowd:
            for i, user in enumerate(users):
                crowd.start_soon(legit, user)
                crowd.start_soon(forger, i)

    assert final == dict.fromkeys(users, "completed"), "every legitimate task completed, none was cancelled"
    assert sum(len(s.runs) for s in sims) == N_USERS, "no forged task reached ComfyUI"
    wrong = [(u, c, m) for u, c, _, m in seen if "taskId" in m and m["taskId"] not in owned[(u, c)]]
    assert wrong == [], "messages delivered to the wrong user"
    assert all(h["destination"] == "/user/topic/messages" for _, _, h, _ in seen)
    per_kind = N_USERS // len(FORGERIES)
    assert {k: len(v) for k, v in outcomes.items()} == dict.fromkeys(FORGERIES, per_kind)
    assert (
        set(outcomes["no_token"])
        == set(outcomes["expired"])
        == set(outcomes["other_secret"])
        == set(outcomes["foreign_cid"])
        == {"ERROR unauthorized"}
    )
    for kind in ("sub_other_user", "sub_topic_other", "sub_queue", "send_elsewhere"):
        assert set(outcomes[kind]) == {"ERROR unknown destination"}, outcomes[kind]
    assert set(outcomes["cancel_foreign"]) == {"rejected not_found"} and cancelled_live > 0
    assert set(outcomes["body_client_id"]) == {"rejected forbidden"}


# ---- 2. heart-beats -----------------------------------------------------------------------------------------


async def count_heartbeats(c: StompClient, arrivals: list[float]) -> None:
    """Read for ever, noting the arrival time of every server heart-beat (a bare EOL)."""
    while True:
        data = await c.ws.get_message()
        before = c.heartbeats
        c.buf += data.encode() if isinstance(data, str) else data
        while c._parse_one() is not None:
            pass
        arrivals.extend([trio.current_time()] * (c.heartbeats - before))


async def test_server_heartbeats_follow_the_negotiated_interval(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100)})
    start = trio.current_time()  # before CONNECT: no heart-beat can be due earlier than start + period
    async with (
        stomp_connect(g.ws_url, token=g.token("hb"), client_id="every200", heartbeat="0,200") as slow,
        stomp_connect(g.ws_url, token=g.token("hb"), client_id="every100", heartbeat="0,100") as fast,
        stomp_connect(g.ws_url, token=g.token("hb"), client_id="never", heartbeat="0,0") as never,
    ):
        # CONNECTED states what the server will do: send every max(sx, cy), expect nothing (cx = 0)
        assert slow.connected and slow.connected.headers["heart-beat"] == "200,0"
        assert fast.connected and fast.connected.headers["heart-beat"] == "100,0"
        assert never.connected and never.connected.headers["heart-beat"] == "0,0"
        beats: dict[str, list[float]] = {"slow": [], "fast": [], "never": []}
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for name, c in (("slow", slow), ("fast", fast), ("never", never)):
                    n.start_soon(count_heartbeats, c, beats[name])
                await wait_until(lambda: len(beats["slow"]) >= 5 and len(beats["fast"]) >= 5)
                n.cancel_scope.cancel()
    # beats k periods apart cannot arrive sooner than k periods after CONNECT (less the tenth of a period a beat
    # may go early to share a timer wake-up) ...
    assert beats["slow"][2] - start >= 0.54 and beats["fast"][2] - start >= 0.27
    # ... each client gets them at its own interval, and the client that asked for none got none
    slow_gap, fast_gap = (
        statistics.median(b - a for a, b in itertools.pairwise(v)) for v in (beats["slow"], beats["fast"])
    )
    assert slow_gap >= 0.15 and fast_gap < 0.75 * slow_gap, (slow_gap, fast_gap)
    assert beats["never"] == []


async def test_silent_client_is_closed_and_beating_client_stays(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"heartbeat_ms": (100, 100)})
    start = trio.current_time()  # before CONNECT: the server cannot give up on it before start + 2 x 200 ms
    async with (
        stomp_connect(g.ws_url, token=g.token("hb"), client_id="silent", heartbeat="200,0") as silent,
        stomp_connect(g.ws_url, token=g.token("hb"), client_id="alive", heartbeat="200,0") as alive,
    ):
        assert silent.connected and silent.connected.headers["heart-beat"] == "0,200"  # expects one every 200 ms
        sent = 0

        async def beat() -> None:
            nonlocal sent
            while True:  # the client's side of the contract: an EOL well within each 200 ms
                await alive.ws.send_message("\n")
                sent += 1
                await trio.sleep(0.1)

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(beat)
                _frame, code = await error_then_close(silent, "heart-beat timeout")
                closed_after = trio.current_time() - start
                # the beating client outlives the silent one by as long again, then still answers
                target = 2 * sent + 4
                await wait_until(lambda: sent >= target)
                await alive.send_frame("SUBSCRIBE", {"id": "s", "destination": "/user/topic/messages", "receipt": "ok"})
                assert await until_receipt(alive, "ok") == []
                n.cancel_scope.cancel()
    assert code == 1002
    assert closed_after >= 0.4, "closed before twice the negotiated interval"


# ---- 3. receipts -------------------------------------------------------------------------------------------


async def test_receipts_for_subscribe_send_unsubscribe_and_disconnect(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url])
    async with stomp_connect(g.ws_url, token=g.token("rc"), client_id="c1") as c:
        await c.send_frame("SUBSCRIBE", {"id": "s0", "destination": "/user/topic/messages", "receipt": "r-sub"})
        frame = await c.next_frame()
        assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "r-sub")

        await c.send_frame("SEND", {"destination": "/app/cancel", "receipt": "r-send"}, '{"taskId": "nope"}')
        got: dict[str, Received] = {}
        while len(got) < 2:  # the RECEIPT and the rejected message, in either order
            frame = await c.next_frame()
            got[frame.command] = frame
        assert got["RECEIPT"].headers["receipt-id"] == "r-send"
        assert got["MESSAGE"].json()["type"] == "rejected" and "taskId" not in got["MESSAGE"].json()

        await c.send_frame("UNSUBSCRIBE", {"id": "s0", "receipt": "r-unsub"})
        frame = await c.next_frame()
        assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "r-unsub")
        # unsubscribed: a rejection now goes to the session, not to this connection
        await c.send_frame("SEND", {"destination": "/app/cancel", "receipt": "r-send2"}, '{"taskId": "nope"}')
        frame = await c.next_frame()
        assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "r-send2")

        await c.send_frame("DISCONNECT", {"receipt": "r-bye"})
        frame = await c.next_frame()
        assert (frame.command, frame.headers["receipt-id"]) == ("RECEIPT", "r-bye")
        assert await close_code(c) == 1000

    async with stomp_connect(g.ws_url, token=g.token("rc"), client_id="c2") as c:  # a refused frame's receipt
        await c.send_frame("SUBSCRIBE", {"id": "s0", "destination": "/queue/x", "receipt": "r-bad"})
        frame, _ = await error_then_close(c, "unknown destination")
        assert frame.headers["receipt-id"] == "r-bad"


# ---- 4. shutdown -------------------------------------------------------------------------------------------


async def test_shutdown_says_goodbye_with_1001_before_the_grace_period(sim: FakeComfyUI, start_gateway: Any) -> None:
    grace = 8.0
    g = await start_gateway([sim.url], web={"shutdown_grace": grace})
    async with (
        stomp_connect(g.ws_url, token=g.token("a"), client_id="c1") as a,
        stomp_connect(g.ws_url, token=g.token("b"), client_id="c1") as b,
    ):
        await subscribed(a)
        await subscribed(b, "/topic/messages")
        results: dict[str, tuple[str, int]] = {}

        async def watch(name: str, c: StompClient) -> None:
            frame, code = await error_then_close(c, "server shutting down", after_messages=True)
            results[name] = (frame.headers["message"], code)

        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(watch, "a", a)
            n.start_soon(watch, "b", b)
            await g.stop()
            stopped_after = trio.current_time() - start
    assert results == {"a": ("server shutting down", 1001), "b": ("server shutting down", 1001)}
    # Hypercorn would have waited `grace` seconds and then cut them (1006) had the connections not closed
    assert stopped_after < grace / 2


# ---- 5. slow consumer ----------------------------------------------------------------------------------------

FLOOD_BODY = 2000  # bytes of padding per flood message
FLOOD_PER_ROUND = 8


async def test_slow_consumer_is_cut_off_without_slowing_the_others(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any]
) -> None:
    budget = 64 * 1024
    g = await start_gateway([sim.url], web={"outbox_bytes": budget, "outbox_delay": 1.0})
    endpoint, handles = parts(apps[-1])["endpoint"], parts(apps[-1])["handles"]
    readers = [(f"r{i}", "c1") for i in range(3)]
    results_tx, results_rx = trio.open_memory_channel[tuple[int, float]](16)

    async def read_probes(c: StompClient) -> None:
        while True:
            _, body = await c.next_message(timeout=30)
            await results_tx.send((body["k"], trio.current_time() - body["t"]))

    async def probe_round(k: int) -> list[float]:
        """One timestamped message into each reader's session; their event -> client latencies."""
        for user, client in readers:
            await handles.sessions.send(
                sessions.Publish(user, client, {"type": "probe", "k": k, "t": trio.current_time()})
            )
        got = []
        for _ in readers:
            kk, latency = await results_rx.receive()
            assert kk == k
            got.append(latency)
        return got

    async with (
        stomp_connect(g.ws_url, token=g.token("r0"), client_id="c1") as r0,
        stomp_connect(g.ws_url, token=g.token("r1"), client_id="c1") as r1,
        stomp_connect(g.ws_url, token=g.token("r2"), client_id="c1") as r2,
        trio.open_nursery() as n,
    ):
        for c in (r0, r1, r2):
            await subscribed(c)
            n.start_soon(read_probes, c)

        # run A: the readers alone
        with trio.fail_after(20):
            alone = [lat for k in range(150) for lat in await probe_round(k)]

        # the slow consumer: a real handshake and subscription, then it never reads again
        slow = await RawWs.open(g.running.port, rcvbuf=8192)
        sc = StompClient(slow)  # type: ignore[arg-type]
        await sc.send_frame(
            "CONNECT",
            {
                "accept-version": "1.2",
                "heart-beat": "0,0",
                "clientId": "s1",
                "Authorization": f"Bearer {g.token('slow')}",
            },
        )
        assert (await sc.next_frame()).command == "CONNECTED"
        await subscribed(sc)
        conn = next(c for c in endpoint.live.values() if c.client_id == "s1")

        # run B: the same probes while the slow consumer's session is flooded, until the gateway cuts it off
        beside, peak, sent, failed_at = [], 0, 0, None
        pad = "x" * FLOOD_BODY
        with trio.fail_after(30):
            k = 1000
            while conn.id in endpoint.live:  # it leaves ``live`` once detached and its tasks are done
                for _ in range(FLOOD_PER_ROUND):
                    sent += 1
                    await handles.sessions.send(
                        sessions.Publish("slow", "s1", {"type": "flood", "n": sent, "pad": pad})
                    )
                    peak = max(peak, conn.outbox.queued_bytes)
                if failed_at is None and conn.outbox.failed is not None:
                    failed_at = trio.current_time()
                beside += await probe_round(k)
                k += 1
        gone_at = trio.current_time()
        # torn down while the others stay: session detached, slot given back, tasks ended
        stats = await hub_stats(apps[-1])
        assert (stats.connections, stats.broadcast_subscribers) == (3, 0)
        assert "slow" not in endpoint.counter.by_user
        assert sorted(c.client_id for c in endpoint.live.values()) == ["c1"] * 3
        assert len(endpoint_tasks()) == 3, endpoint_tasks()  # one handler per remaining connection, no reader
        n.cancel_scope.cancel()

    # (a) cut off once its outbox passed its budget: the socket is closed under the unread data
    assert conn.outbox.failed is not None and f"more than {budget} bytes" in conn.outbox.failed
    seqs: list[int] = []
    with trio.fail_after(20):
        try:
            while True:
                frame = await sc.next_frame()
                if frame.command == "MESSAGE":
                    seqs.append(int(frame.headers["seq"]))
                else:
                    assert (frame.command, frame.headers.get("message")) == ("ERROR", "slow consumer")
        except (RawClosed, trio.BrokenResourceError, ConnectionResetError):
            pass  # the end of the TCP connection (a cut may end mid-frame)
    await slow.aclose()
    # seqs start above the run's base (actors/sessions.py seq_base): consecutive from the first one
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) < sent, "arrived in order"
    # the writer was stuck in a send: the watchdog cut it CLOSE_GRACE after the outbox failed
    assert failed_at is not None and gone_at - failed_at <= CLOSE_GRACE + 2.0
    # (b) memory for it stayed bounded
    assert 0 < peak <= budget
    await wait_until(lambda: not endpoint.live and not endpoint_tasks())
    scrape = (await g.http.get(f"{g.url}/metrics")).text
    assert "gateway_slow_consumers_total 1.0" in scrape.splitlines()
    # (c) the readers were not slowed down (2x, or +20 ms on a noisy machine)
    for q in (0.5, 0.9):
        a, b = quantile(alone, q), quantile(beside, q)
        assert b <= max(2 * a, a + 0.020), f"p{q * 100:.0f} latency {b * 1000:.2f} ms vs {a * 1000:.2f} ms alone"


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q * 100) - 1]


# ---- 6. limits -----------------------------------------------------------------------------------------------


async def test_socket_without_connect_is_closed(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"connect_timeout": 0.3})
    async with open_websocket_url(g.ws_url, subprotocols=["v12.stomp"]) as ws:
        start = trio.current_time()
        _frame, code = await error_then_close(StompClient(ws), "no CONNECT")
        assert trio.current_time() - start >= 0.25 and code == 1008
        await ws._stream.aclose()


async def test_frame_too_large(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"max_frame_size": 1024})
    async with stomp_connect(g.ws_url, token=g.token("big"), client_id="c1") as c:
        await c.send_frame("SEND", {"destination": "/app/tasks"}, "x" * 4000)
        await error_then_close(c, "frame too large")
    async with stomp_connect(g.ws_url, token=g.token("big"), client_id="c1") as c:  # just under the limit: fine
        await c.send_frame("SEND", {"destination": "/app/cancel", "receipt": "r"}, json.dumps({"taskId": "y" * 800}))
        frame = await c.next_frame()
        assert frame.command == "RECEIPT"


async def test_subscription_cap(sim: FakeComfyUI, start_gateway: Any) -> None:
    g = await start_gateway([sim.url], web={"max_subscriptions": 1})
    async with stomp_connect(g.ws_url, token=g.token("subs"), client_id="c1") as c:
        await subscribed(c)
        await c.subscribe("/topic/messages", "sub-1")
        await error_then_close(c, "too many subscriptions")


async def test_connection_cap_per_user(sim: FakeComfyUI, start_gateway: Any, apps: list[Any]) -> None:
    g = await start_gateway([sim.url], web={"max_connections_per_user": 2})
    async with (
        stomp_connect(g.ws_url, token=g.token("cap"), client_id="c1") as one,
        stomp_connect(g.ws_url, token=g.token("cap"), client_id="c2"),
    ):
        async with stomp_connect(g.ws_url, token=g.token("cap"), client_id="c3", expect_connected=False) as third:
            await error_then_close(third, "too many connections")
        async with stomp_connect(g.ws_url, token=g.token("other"), client_id="c1"):
            pass  # the cap is per user
        await one.send_frame("DISCONNECT", {"receipt": "bye"})
        assert (await one.next_frame()).command == "RECEIPT"
        await close_code(one)
        # the slot is free by the time the client sees the close: no retry needed
        async with stomp_connect(g.ws_url, token=g.token("cap"), client_id="c3") as again:
            assert again.connected is not None
    await wait_until(lambda: not parts(apps[-1])["endpoint"].counter.by_user)


@pytest.mark.parametrize("enabled", [False, True])
async def test_permessage_deflate(sim: FakeComfyUI, start_gateway: Any, enabled: bool) -> None:
    g = await start_gateway([sim.url], web={"permessage_deflate": enabled})
    raw = await RawWs.open(g.running.port, deflate=True)  # offered, as browsers always do
    try:
        assert raw.accepted is not None and raw.accepted.subprotocol == "v12.stomp"
        names = [ext.name for ext in raw.accepted.extensions]
        assert names == (["permessage-deflate"] if enabled else [])
        c = StompClient(raw)  # type: ignore[arg-type]
        await c.send_frame("CONNECT", {"accept-version": "1.2", "Authorization": f"Bearer {g.token('z')}"})
        frame = await c.next_frame()
        assert frame.command == "CONNECTED" and frame.headers["user-name"] == "z"
    finally:
        await raw.aclose()


@pytest.mark.usefixtures("thawed")  # the endpoint freezes below
@pytest.mark.parametrize("heartbeat", ["0,0", "10000,10000"])  # with heart-beats the tap takes them, and rests
async def test_closed_connections_are_freed_without_the_cycle_collector(
    sim: FakeComfyUI, start_gateway: Any, apps: list[Any], heartbeat: str
) -> None:
    """A frozen connection (web._gc) that closes is freed by reference counting alone, our objects and Hypercorn's
    (web._reap), whether it ends cleanly, is cut by its client or is closed for a protocol error: none leaves a
    reference cycle, so none stays in memory until a thaw (a full collection: ≈ 1.7 s of stall at 10,000)."""
    from web._gc import FreezePolicy

    g = await start_gateway([sim.url])
    endpoint = parts(apps[-1])["endpoint"]
    endpoint.freezer = FreezePolicy(every=3)  # a freeze after every 3 connects: all 6 below are frozen
    raws = [await RawWs.open(g.running.port) for _ in range(6)]
    clients = [StompClient(raw) for raw in raws]  # type: ignore[arg-type]
    for i, c in enumerate(clients):
        token = g.token(f"gc{i}")
        await c.send_frame("CONNECT", {"accept-version": "1.2", "heart-beat": heartbeat, "passcode": token})
        assert (await c.next_frame()).command == "CONNECTED"
        await subscribed(c)
    assert len(endpoint.live) == 6 and set(endpoint.live) <= endpoint.freezer.frozen
    refs = [weakref.ref(conn) for conn in endpoint.live.values()]
    refs += [weakref.ref(conn.io._found()[1]) for conn in endpoint.live.values()]  # Hypercorn's TCPServer too

    gc.disable()
    try:
        for c in clients[:2]:  # clean: DISCONNECT, its receipt, the close handshake
            await c.send_frame("DISCONNECT", {"receipt": "bye"})
            assert (await c.next_frame()).command == "RECEIPT"
            assert await until_closed(c.ws) is not None, "closed without a close frame"
        for raw in raws[2:4]:  # cut: the TCP connection just ends
            await raw.aclose()
        for c in clients[4:]:  # a protocol error: ERROR, then the server closes
            await c.send_frame("BOGUS", {})
            assert (await c.next_frame()).command == "ERROR"
            assert await until_closed(c.ws) is not None, "closed without a close frame"
        await wait_until(lambda: not endpoint.live)
        await wait_until(lambda: all(ref() is None for ref in refs))  # the collector is off: refcounts alone
    finally:
        gc.enable()
    assert endpoint.freezer.thaws == 0 and not endpoint.freezer.frozen
