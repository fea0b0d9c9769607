"""A closed SockJS session is freed by reference counting alone, as a closed ``/ws`` connection is
(``tests/test_stomp_endpoint.py``, and below): however it ends, nothing of it waits for a full collection. The endpoint
freezes its connections out of full collections (``web._gc``), so a session kept by a reference cycle would stay in
memory until a thaw: a full collection over every live connection, ≈ 1.7 s of stall at 10,000."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing
from conftest import GatewayUnderTest, parts
from stomp_client import StompClient
from test_sockjs_live import messages, poll, poll_stomp, send, session_url, stomp
from test_stomp_endpoint import RawWs, until_closed, wait_until
from trio_websocket import open_websocket_url

from web._gc import FreezePolicy
from web.sockjs import SockJSConfig

pytestmark = pytest.mark.usefixtures("thawed")  # the endpoints' freezes: the process is thawed after each test


def connect(g: GatewayUnderTest, user: str) -> str:
    return stomp("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0", "Authorization": f"Bearer {g.token(user)}"})


async def websocket_session(g: GatewayUnderTest, how: str, watch: Callable[[], None]) -> None:
    """A SockJS ``websocket`` session that connects STOMP, then ends ``how``."""
    url = session_url(g).replace("http://", "ws://") + "/websocket"
    if how == "client closes":  # trio-websocket's close handshake
        async with open_websocket_url(url) as ws:
            assert await ws.get_message() == "o"
            await ws.send_message(json.dumps([connect(g, "ws-close")]))
            assert messages(await ws.get_message())[0].startswith("CONNECTED\n")
            watch()
        return
    raw = await RawWs.open(g.running.port, target=urlsplit(url).path)
    assert await raw.get_message() == "o"
    await raw.send_message(json.dumps([connect(g, "ws-" + how.replace(" ", "-"))]))
    assert messages(await raw.get_message())[0].startswith("CONNECTED\n")
    watch()
    if how == "client cut":  # the TCP connection just ends
        await raw.aclose()
        return
    if how == "DISCONNECT":
        await raw.send_message(json.dumps([stomp("DISCONNECT", {})]))
    else:  # broken SockJS framing: the server ends the session
        await raw.send_message('["a')
    await until_closed(raw)
    await raw.aclose()


async def plain_session(g: GatewayUnderTest, how: str, watch: Callable[[], None]) -> None:
    """A plain ``/ws`` STOMP connection that ends ``how`` (for comparison: the same rules hold there)."""
    raw = await RawWs.open(g.running.port)
    client = StompClient(raw)  # type: ignore[arg-type]
    await client.send_frame("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0", "passcode": g.token("plain")})
    assert (await client.next_frame()).command == "CONNECTED"
    watch()
    if how == "client cut":
        await raw.aclose()
        return
    await client.send_frame("DISCONNECT", {"receipt": "bye"})
    assert (await client.next_frame()).command == "RECEIPT"
    await until_closed(raw)
    await raw.aclose()


async def xhr_session(g: GatewayUnderTest, how: str, watch: Callable[[], None]) -> None:
    """A SockJS ``xhr`` (polling) session that connects STOMP, then ends ``how``."""
    url = session_url(g)
    assert await poll(g.http, url) == "o\n"
    await send(g.http, url, connect(g, "xhr-" + how.split()[0]))
    await poll_stomp(g.http, url, "CONNECTED")
    watch()
    if how == "DISCONNECT":
        await send(g.http, url, stomp("DISCONNECT", {"receipt": "bye"}))
        await poll_stomp(g.http, url, "RECEIPT")
    # else: the client stops polling, and the session ends after disconnect_delay


@pytest.mark.parametrize(
    ("transport", "how"),
    [
        ("websocket", "client closes"),
        ("websocket", "client cut"),
        ("websocket", "DISCONNECT"),
        ("websocket", "broken framing"),
        ("xhr", "DISCONNECT"),
        ("xhr", "abandoned"),
    ],
)
async def test_closed_sockjs_sessions_are_freed_without_the_cycle_collector(
    start_gateway: Any, apps: list[Any], transport: str, how: str
) -> None:
    g = await start_gateway(["http://127.0.0.1:9"], web={"sockjs": SockJSConfig(disconnect_delay=1.0)})
    endpoint = parts(apps[-1])["endpoint"]
    endpoint.freezer = FreezePolicy(every=2)  # a freeze at the second connect: the keeper's and the session's
    # a keeper: a connected session that stays open meanwhile (a SockJS WebSocket: it does not expire)
    keeper_ws = await RawWs.open(g.running.port, target=urlsplit(session_url(g)).path + "/websocket")
    assert await keeper_ws.get_message() == "o"
    await keeper_ws.send_message(json.dumps([connect(g, "keeper")]))
    assert messages(await keeper_ws.get_message())[0].startswith("CONNECTED\n")
    [keeper] = endpoint.live
    refs: list[weakref.ref[Any]] = []

    def watch() -> None:
        """Weak references to the session's connection, its transport and, under a WebSocket, Hypercorn's
        TCPServer."""
        [conn] = [c for c in endpoint.live.values() if c.id != keeper]
        assert conn.id in endpoint.freezer.frozen
        refs.append(weakref.ref(conn))
        refs.append(weakref.ref(conn.io))  # the session's transport: its state, pending messages, channels
        if transport == "websocket":
            tcp = conn.io.abort.func.__self__  # partial(TCPServer.protocol_send, Closed()): web._transport
            assert type(tcp).__name__ == "ReapingTCPServer"
            refs.append(weakref.ref(tcp))

    gc.disable()
    try:
        await (websocket_session if transport == "websocket" else xhr_session)(g, how, watch)
        await wait_until(lambda: list(endpoint.live) == [keeper])
        await wait_until(lambda: all(ref() is None for ref in refs))  # the collector is off: refcounts alone
    finally:
        gc.enable()
    assert len(refs) == (3 if transport == "websocket" else 2)
    assert endpoint.freezer.thaws == 0 and endpoint.freezer.frozen == {keeper}
    await keeper_ws.aclose()


def _ours(obj: object) -> str | None:
    """A name for ``obj`` if it belongs to the server side (our code, Hypercorn, Quart), else None. Frames count by
    their code's file: a cycle through an exception's traceback shows up as frames."""
    if type(obj).__name__ == "frame":
        path = obj.f_code.co_filename  # type: ignore[attr-defined]
        if any(part in path for part in ("/web/", "/actors/", "/hypercorn/", "/quart/", "/quart_trio/")):
            return f"frame of {obj.f_code.co_name} ({path.rsplit('/', 2)[-2]})"  # type: ignore[attr-defined]
        return None
    module = type(obj).__module__
    if module.split(".")[0] in ("web", "actors", "hypercorn", "quart", "quart_trio"):
        return f"{module}.{type(obj).__qualname__}"
    return None


@pytest.mark.parametrize(
    ("transport", "how"),
    [
        ("websocket", "client closes"),
        ("websocket", "client cut"),
        ("xhr", "DISCONNECT"),
        ("xhr", "abandoned"),
        ("/ws", "DISCONNECT"),
        ("/ws", "client cut"),
    ],
)
async def test_closed_sessions_leave_no_cyclic_garbage_of_the_server(
    sim: Any, start_gateway: Any, apps: list[Any], transport: str, how: str
) -> None:
    """The weak references above watch the objects we know of; this looks at everything a closed session leaves
    for the cycle collector (``gc.DEBUG_SAVEALL``): nothing of ours, Hypercorn's or Quart's may be in it, or a
    frozen session would keep it in memory until a thaw that nothing triggers. (werkzeug's routing closure of a
    request and the test clients' own objects are cyclic garbage too: young, and not the server's to keep.)"""
    g = await start_gateway([sim.url], web={"sockjs": SockJSConfig(disconnect_delay=1.0)})
    endpoint, sockjs = parts(apps[-1])["endpoint"], parts(apps[-1])["sockjs"]
    run = {"websocket": websocket_session, "xhr": xhr_session, "/ws": plain_session}[transport]

    async def ended() -> None:
        await wait_until(lambda: not endpoint.live and not sockjs.sessions)
        await trio.testing.wait_all_tasks_blocked()  # the session's tasks have finished their clean-up

    await run(g, how, lambda: None)  # once first: what the first session makes for good is not garbage
    await ended()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            await run(g, how, lambda: None)
            await ended()
        gc.collect()
        left = sorted(name for obj in gc.garbage if (name := _ours(obj)) is not None)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
